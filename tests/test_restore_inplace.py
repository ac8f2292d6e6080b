"""In-place restores: the live database and uploads are replaced only once the copy is proven.

Each test breaks the live system the way an incident would, restores, and checks that the
result equals the state at backup time, that the replaced state was kept, and that a safety
backup was taken first.
"""

from __future__ import annotations

import json
import os
import shutil

import psycopg
import pytest

from conexa_backup.testing.compare import plain_dump, tree_snapshot
from tests.conftest import Workspace


def _backup(ws: Workspace) -> str:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    backup_id: str = json.loads(result.stdout)["id"]
    return backup_id


def test_restore_in_place_replaces_broken_data_and_keeps_the_old(ws: Workspace) -> None:
    before_db = plain_dump(ws.cluster.env(), ws.dbname)
    before_tree = tree_snapshot(ws.uploads)
    backup_id = _backup(ws)

    # The incident: rows deleted, a table dropped, files lost and junk added.
    ws.cluster.execute("DELETE FROM grades; DROP TABLE attendance CASCADE", ws.dbname)
    shutil.rmtree(ws.uploads / "documentos")
    (ws.uploads / "junk.txt").write_text("not in the backup")
    broken_db = plain_dump(ws.cluster.env(), ws.dbname)

    result = ws.run("restore", backup_id, "--yes", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert plain_dump(ws.cluster.env(), ws.dbname) == before_db
    assert tree_snapshot(ws.uploads) == before_tree
    # The replaced state is kept, under the names the report gives.
    kept_db = report["previous_database"]
    assert kept_db.startswith(ws.dbname) and "before_restore" in kept_db
    assert plain_dump(ws.cluster.env(), kept_db) == broken_db
    kept_tree = tree_snapshot(ws.root / "srv" / report["previous_uploads"].rsplit("/", 1)[1])
    assert "junk.txt" in kept_tree
    # And a safety backup of that state exists, marked as such.
    listing = json.loads(ws.run("list", "--json").stdout)
    safety = [b for b in listing if b["id"] == report["safety_backup_id"]]
    assert safety and safety[0]["kind"] == "safety" and safety[0]["status"] == "complete"
    assert not any(name.endswith(f"__restoring_{backup_id}") for name in ws.cluster.databases())


def test_latest_never_means_a_safety_backup(ws: Workspace) -> None:
    before_db = plain_dump(ws.cluster.env(), ws.dbname)
    backup_id = _backup(ws)
    ws.cluster.execute("DELETE FROM grades", ws.dbname)
    first = json.loads(ws.run("restore", "latest", "--yes", "--json").stdout)
    assert first["id"] == backup_id
    # Restoring "latest" again must not pick the safety backup (the broken state).
    second = ws.run("restore", "latest", "--yes", "--json", "--no-safety-backup")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["id"] == backup_id
    assert plain_dump(ws.cluster.env(), ws.dbname) == before_db


def test_restore_when_the_database_is_gone(ws: Workspace) -> None:
    before_db = plain_dump(ws.cluster.env(), ws.dbname)
    _backup(ws)
    ws.cluster.drop_database(ws.dbname)
    result = ws.run("restore", "--only", "database", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["previous_database"] is None and report["safety_backup_id"] is None
    assert plain_dump(ws.cluster.env(), ws.dbname) == before_db


def test_restore_uploads_only_when_the_folder_is_gone(ws: Workspace) -> None:
    before_tree = tree_snapshot(ws.uploads)
    before_db = plain_dump(ws.cluster.env(), ws.dbname)
    _backup(ws)
    ws.cluster.execute("DELETE FROM grades", ws.dbname)  # must NOT be undone: uploads only
    after_db = plain_dump(ws.cluster.env(), ws.dbname)
    shutil.rmtree(ws.uploads)
    result = ws.run("restore", "--only", "uploads", "--yes")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(ws.uploads) == before_tree
    assert plain_dump(ws.cluster.env(), ws.dbname) == after_db != before_db


def test_open_application_sessions_do_not_block_the_swap(ws: Workspace) -> None:
    backup_id = _backup(ws)
    app = psycopg.connect(ws.cluster.url(ws.dbname), autocommit=True)
    try:
        app.execute("SELECT 1")
        result = ws.run("restore", backup_id, "--only", "database", "--yes",
                        "--no-safety-backup")
        assert result.returncode == 0, result.stderr
        with pytest.raises(psycopg.OperationalError):
            app.execute("SELECT 1")  # the old session was ended by the swap
    finally:
        app.close()
    with psycopg.connect(ws.cluster.url(ws.dbname)) as conn:
        row = conn.execute("SELECT count(*) FROM students").fetchone()
    assert row is not None and row[0] > 0


def test_two_restores_in_the_same_second_keep_both_old_states(ws: Workspace) -> None:
    backup_id = _backup(ws)
    kept = []
    for _ in range(2):  # fast enough to share a timestamp: names must still be unique
        result = ws.cli("restore", backup_id, "--yes", "--json", "--no-safety-backup")
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
        report = json.loads(result.stdout)  # type: ignore[attr-defined]
        kept.append((report["previous_database"], report["previous_uploads"]))
    assert kept[0][0] != kept[1][0] and kept[0][1] != kept[1][1]
    assert {kept[0][0], kept[1][0]} <= ws.cluster.databases()


def test_links_leaving_the_tree_come_back_in_place_exactly(ws: Workspace) -> None:
    """Symlinks are data: absolute, out of the tree, dangling, all restored with their text.
    Before: every restore failed with "no good copy: ... is a link to an absolute path"."""
    links = {"etc-hostname": "/etc/hostname", "nowhere": "../nowhere",
             "documentos/dangling": "/nonexistent/file.pdf", "up": "../"}
    for name, target in links.items():
        (ws.uploads / name).symlink_to(target)
    before_tree = tree_snapshot(ws.uploads)
    backup_id = _backup(ws)
    shutil.rmtree(ws.uploads / "documentos")
    (ws.uploads / "nowhere").unlink()

    result = ws.run("restore", backup_id, "--only", "uploads", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(ws.uploads) == before_tree
    assert {n: os.readlink(ws.uploads / n) for n in links} == links  # noqa: PTH115 - verbatim
    assert not (ws.root / "srv" / "nowhere").exists()  # nothing written through a link


def test_uploads_path_that_is_a_link_is_restored_where_it_points(ws: Workspace) -> None:
    """``[uploads] path`` is a link to the real folder on another volume: the restored tree
    takes the real folder's place there, and the link stays. Before: the link was swapped for
    a real folder beside it (the restored data on the link's volume) and kept as the old tree."""
    real = ws.root / "volume" / "uploads"
    real.parent.mkdir()
    ws.uploads.rename(real)
    ws.uploads.symlink_to(real)
    before_tree = tree_snapshot(real)
    backup_id = _backup(ws)
    shutil.rmtree(real / "documentos")

    result = ws.run("restore", backup_id, "--only", "uploads", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert ws.uploads.is_symlink() and ws.uploads.resolve() == real
    assert tree_snapshot(real) == before_tree
    kept = json.loads(result.stdout)["previous_uploads"]
    assert os.path.dirname(kept) == str(real.parent)  # noqa: PTH120 - a string from JSON
    assert "documentos" not in os.listdir(kept)
