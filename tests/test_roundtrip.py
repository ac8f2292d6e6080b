"""Round trips on real data: back up, restore side by side, prove equality.

Equality means: the same plain ``pg_dump`` text (schema and every row, sequences included),
the same per-table row counts, and the same uploads tree (paths, bytes, modes, links, mtimes).
Run on the Conexa-like sample and on real public databases nobody here wrote (Chinook, Pagila).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.compare import plain_dump, table_row_counts, tree_snapshot
from tests.conftest import Workspace, fresh_db

DATASETS = Path(os.environ.get("CONEXA_DATASETS",
                               Path(__file__).resolve().parents[2] / "shared" / "datasets"))


@pytest.fixture(scope="session")
def chinook(cluster: Cluster) -> str:
    path = DATASETS / "chinook" / "Chinook_PostgreSql.sql"
    if not path.exists():
        pytest.skip(f"dataset not found: {path}")
    cluster.load_sql_file(path)  # creates and fills database "chinook"
    return "chinook"


@pytest.fixture(scope="session")
def pagila(cluster: Cluster) -> str:
    path = DATASETS / "pagila" / "pagila-schema.sql"
    if not path.exists():
        pytest.skip(f"dataset not found: {path}")
    cluster.create_database("pagila")
    cluster.load_sql_file(path, "pagila")
    return "pagila"


def _backup_and_restore(ws: Workspace, source_db: str) -> tuple[str, str, Path]:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["id"]
    copy_db, copy_uploads = f"{ws.dbname}_copy", ws.root / "restored uploads"
    result = ws.run("restore", backup_id, "--to-database", copy_db,
                    "--uploads-to", str(copy_uploads))
    assert result.returncode == 0, result.stderr
    return backup_id, copy_db, copy_uploads


def _assert_same_database(cluster: Cluster, a: str, b: str) -> None:
    assert plain_dump(cluster.env(), a) == plain_dump(cluster.env(), b)
    counts = table_row_counts(cluster.url(a))
    assert counts and counts == table_row_counts(cluster.url(b))


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_conexa_round_trip(ws: Workspace, compression: str) -> None:
    ws.write_config(compression=compression)
    backup_id, copy_db, copy_uploads = _backup_and_restore(ws, ws.dbname)
    _assert_same_database(ws.cluster, ws.dbname, copy_db)
    assert tree_snapshot(copy_uploads) == tree_snapshot(ws.uploads)
    suffix = ".zst" if compression == "zstd" else ".gz"
    assert (ws.backups / backup_id / f"database.dump{suffix}").is_file()


@pytest.mark.parametrize("dataset", ["chinook", "pagila"])
def test_public_dataset_round_trip(ws: Workspace, dataset: str,
                                   request: pytest.FixtureRequest) -> None:
    template = request.getfixturevalue(dataset)
    source = fresh_db(ws.cluster, template, prefix=ws.dbname)
    ws.write_config(database=source)
    _, copy_db, copy_uploads = _backup_and_restore(ws, source)
    assert plain_dump(ws.cluster.env(), source) == plain_dump(ws.cluster.env(), copy_db)
    assert table_row_counts(ws.cluster.url(source)) == table_row_counts(ws.cluster.url(copy_db))
    assert tree_snapshot(copy_uploads) == tree_snapshot(ws.uploads)


def test_manifest_records_what_a_restore_must_prove(ws: Workspace) -> None:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    backup_id = json.loads(result.stdout)["id"]
    manifest = json.loads((ws.backups / backup_id / "manifest.json").read_text())
    counts = table_row_counts(ws.cluster.url(ws.dbname))
    assert manifest["database"]["tables"] == counts
    assert manifest["database"]["server_version"].startswith("15")
    assert manifest["uploads"]["files"] == sum(
        1 for kind, *_ in tree_snapshot(ws.uploads).values() if kind == "file")
    for artifact in manifest["artifacts"]:
        data = (ws.backups / backup_id / artifact["name"]).read_bytes()
        assert len(data) == artifact["size"]
        import hashlib
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]


def test_globals_are_kept_when_configured(ws: Workspace) -> None:
    ws.config.write_text(ws.config.read_text().replace(
        "[database]\n", "[database]\nglobals = true\n"))
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    names = [a["name"] for a in json.loads(result.stdout)["artifacts"]]
    assert "globals.sql.zst" in names
    backup_id = json.loads(result.stdout)["id"]
    sql = subprocess.run(["zstd", "-dc", str(ws.backups / backup_id / "globals.sql.zst")],
                         capture_output=True, check=True, text=True).stdout
    assert "CREATE ROLE postgres" in sql


def test_manual_restore_with_stock_tools(ws: Workspace, tmp_path: Path) -> None:
    """The README's by-hand procedure (zstd, pg_restore, tar) works without this tool."""
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    folder = ws.backups / json.loads(result.stdout)["id"]
    dump = tmp_path / "database.dump"
    subprocess.run(["zstd", "-d", "-q", str(folder / "database.dump.zst"), "-o", str(dump)],
                   check=True)
    target = f"{ws.dbname}_by_hand"
    ws.cluster.create_database(target)
    env = {**os.environ, **ws.cluster.env()}
    subprocess.run(["pg_restore", "--exit-on-error", "-j", "2", "-d", target, str(dump)],
                   check=True, env=env)
    assert plain_dump(ws.cluster.env(), ws.dbname) == plain_dump(ws.cluster.env(), target)
    out = tmp_path / "uploads"
    out.mkdir()
    zstd = subprocess.Popen(["zstd", "-dc", str(folder / "uploads.tar.zst")],
                            stdout=subprocess.PIPE)
    subprocess.run(["tar", "-xpf", "-", "-C", str(out)], stdin=zstd.stdout, check=True)
    assert zstd.wait() == 0
    assert tree_snapshot(out) == tree_snapshot(ws.uploads)


def test_parallel_directory_dump_round_trip(ws: Workspace) -> None:
    """``dump_jobs = 2``: a directory-format dump by parallel workers, stored as one tar."""
    ws.config.write_text(ws.config.read_text().replace(
        "[database]\n", "[database]\ndump_jobs = 2\n"))
    backup_id, copy_db, _ = _backup_and_restore(ws, ws.dbname)
    manifest = json.loads((ws.backups / backup_id / "manifest.json").read_text())
    database = next(a for a in manifest["artifacts"] if a["kind"] == "database")
    assert (database["name"], database["content"]) == ("database.dir.tar.zst",
                                                        "pg_dump-directory")
    _assert_same_database(ws.cluster, ws.dbname, copy_db)
    assert manifest["database"]["tables"] == table_row_counts(ws.cluster.url(ws.dbname))
    drill = ws.run("verify", "--drill", backup_id, "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    assert not list((ws.state / "staging").iterdir())  # the spooled folder is gone
    # Each table's file is archived as soon as pg_dump reports its worker finished it (so
    # compression overlaps the dump), in that order, unless the kernel would not confirm that
    # nobody writes it any more: then it waits for the final sweep (sorted), with toc.dat.
    result = ws.run("--verbose", "backup", "--json", "--no-prune")
    assert result.returncode == 0, result.stderr
    reported = [f"{n}.dat" for n in re.findall(r"finished item (\d+) TABLE DATA", result.stderr)]
    listing = _tar_listing(ws.backups / json.loads(result.stdout)["id"] / "database.dir.tar.zst")
    assert len(reported) == len(manifest["database"]["tables"]) > 1
    assert listing[0] == "./" and sorted(listing[1:]) == sorted([*reported, "toc.dat"])
    early = _early_moves(listing[1:], reported)
    assert listing[1 + len(early):] == sorted(listing[1 + len(early):]), (reported, listing)
    assert len(early) >= len(reported) // 2, (reported, listing)  # the overlap happened


def _early_moves(archived: list[str], reported: list[str]) -> list[str]:
    """The longest start of ``archived`` that follows ``reported``'s order (skipping some)."""
    position = {name: i for i, name in enumerate(reported)}
    early: list[str] = []
    for name in archived:
        if name not in position or (early and position[name] < position[early[-1]]):
            break
        early.append(name)
    return early


def _tar_listing(path: Path) -> list[str]:
    zstd = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
    listing = subprocess.run(["tar", "-tf", "-"], stdin=zstd.stdout, check=True,
                             capture_output=True, text=True).stdout.splitlines()
    assert zstd.wait() == 0
    return listing


def _round_trip_with_drill(ws: Workspace, restored: Path) -> str:
    """Backup, ``restore --only uploads --uploads-to restored``, drill: each exits 0."""
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    backup_id: str = json.loads(result.stdout)["id"]
    restore = ws.run("restore", backup_id, "--only", "uploads", "--uploads-to", str(restored),
                     "--yes")
    assert restore.returncode == 0, restore.stdout + restore.stderr
    drill = ws.run("verify", "--drill", backup_id, "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    return backup_id


def test_names_that_are_not_utf8_round_trip(ws: Workspace, tmp_path: Path) -> None:
    """Before: UnicodeEncodeError writing the uploads index: the whole backup failed, the
    database included. A Latin-1 name comes back as the same bytes, and the drill finds it."""
    folder, name = os.fsdecode(b"r\xe9sum\xe9s"), os.fsdecode(b"caf\xe9.txt")  # as os.listdir
    (ws.uploads / folder).mkdir()
    (ws.uploads / folder / name).write_bytes(b"latin-1 name")
    (ws.uploads / os.fsdecode(b"lien-\xe9")).symlink_to(f"{folder}/{name}")
    restored = tmp_path / "restored"
    backup_id = _round_trip_with_drill(ws, restored)
    assert tree_snapshot(restored) == tree_snapshot(ws.uploads)
    assert b"r\xe9sum\xe9s" in os.listdir(os.fsencode(restored))  # the same bytes
    assert os.listdir(os.fsencode(restored / folder)) == [b"caf\xe9.txt"]
    assert (restored / folder / name).read_bytes() == b"latin-1 name"
    assert os.fsencode((restored / os.fsdecode(b"lien-\xe9")).readlink()) == \
        b"r\xe9sum\xe9s/caf\xe9.txt"
    index = subprocess.run(["zstd", "-dc", str(ws.backups / backup_id / "uploads.index.jsonl.zst")],
                           capture_output=True, check=True).stdout
    assert b'"r\\udce9sum\\udce9s/caf\\udce9.txt"' in index  # ASCII, read back as the name


def test_uploads_path_that_is_a_link_to_the_folder_round_trips(ws: Workspace,
                                                               tmp_path: Path) -> None:
    """``/var/www/app/uploads -> /srv/uploads``. Before: the archive's root was stored as that
    link, and every restore refused it ("the archive's root is not a folder")."""
    real = tmp_path / "real-uploads"
    ws.uploads.rename(real)
    ws.uploads.symlink_to(real)
    restored = tmp_path / "restored"
    _round_trip_with_drill(ws, restored)
    assert tree_snapshot(restored) == tree_snapshot(real)
    assert restored.is_dir() and not restored.is_symlink()
    checked = ws.run("check", "--json")
    uploads = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "uploads")
    assert uploads["ok"] and f"a link to {real}" in uploads["detail"], uploads
