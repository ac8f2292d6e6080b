"""Guards against quiet loss: private state, a shrunken uploads folder, an unmounted backup
disk, and a table lock that would hold the nightly dump forever (issue 13, §2 and §4).

The CLI runs as a real subprocess, so umask, exit codes and stderr are what cron sees.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from conexa_backup import postgres
from conexa_backup.actions.backup import shrink_warning
from conexa_backup.config import DatabaseConfig, UploadsConfig
from conexa_backup.durations import parse_duration
from conexa_backup.manifest import UploadsInfo
from conexa_backup.testing.sample import make_uploads_tree
from tests.test_failures import (
    assert_error,
    backup_ok,
    cli_argv,
    complete_ids,
    configure,
    make_bin_dir,
    tmpfs,
    wait_for,
)

# -- state_dir is private, whichever command runs first ---------------------------------------

FIRST_COMMANDS: list[tuple[str, ...]] = [
    ("list",), ("list", "--json"), ("status",), ("check",), ("report",), ("prune", "--dry-run"),
    ("verify", "latest"), ("verify", "--drill", "latest"), ("download", "latest", "--to", "{out}"),
    ("notify-test",), ("prune",), ("backup",), ("restore", "latest", "--yes"),
]


def _not_private(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that is not a 0700 folder or 0600 file."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            wrong.append(f"{path.relative_to(root.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return wrong


def test_state_dir_is_private_whichever_command_runs_first(ws: Any, tmp_path: Path) -> None:
    """Under umask 022, each command run first on a fresh (and not yet existing, two levels
    deep) state_dir leaves only 0700 folders and 0600 files there: ``state_dir`` itself,
    ``cache/manifests/<target>``, ``logs/``, ``staging/``, ``drills/``."""
    backup_ok(ws)  # the target holds a backup, so that list/verify/... have manifests to cache
    config = ws.config.read_text(encoding="utf-8")
    wrong: dict[str, list[str]] = {}
    for i, command in enumerate(FIRST_COMMANDS):
        fresh = tmp_path / f"fresh-{i}"
        ws.config.write_text(config.replace(f'state_dir = "{ws.state}"',
                                            f'state_dir = "{fresh / "state"}"'), encoding="utf-8")
        argv = [a.format(out=tmp_path / f"out-{i}") for a in command]
        proc = subprocess.run(cli_argv(ws, *argv), capture_output=True, text=True, timeout=180,
                              stdin=subprocess.DEVNULL, umask=0o022, check=False)
        assert (fresh / "state").is_dir(), f"{command}: {proc.returncode} {proc.stderr}"
        if _not_private(fresh):
            wrong[" ".join(command)] = _not_private(fresh)
    assert wrong == {}


# -- an empty or shrunken uploads folder ------------------------------------------------------

def _backup_json(ws: Any) -> tuple[int, dict[str, Any], str]:
    proc = ws.run("backup", "--json")
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_empty_uploads_folder_warns_and_holds_the_prune_back(ws: Any) -> None:
    """An empty uploads folder (an unmounted volume) is stored but the run is partial (exit 3)
    and prunes nothing: the older backups still hold the files. Pruning resumes once the
    folder is back."""
    ws.write_config("[retention]\nkeep_last = 1\n")
    first = backup_ok(ws)
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir()

    code, result, stderr = _backup_json(ws)

    assert code == 3, stderr
    assert result["status"] == "partial"
    assert len(result["warnings"]) == 1 and "is empty" in result["warnings"][0]
    assert "not pruned" in result["warnings"][0] and "is empty" in stderr
    assert [p["skipped"] for p in result["pruned"]] == [
        "the uploads folder looked empty or shrunken (see the backup's warnings)"]
    assert sorted(complete_ids(ws)) == [first, result["id"]]  # keep_last = 1 deleted nothing

    make_uploads_tree(ws.uploads, files=60, seed=7)
    third = backup_ok(ws)
    assert complete_ids(ws) == [third]  # back to normal: the policy applies again


def _emptied_backup(ws: Any) -> str:
    """A backup of the uploads folder emptied (a volume not mounted): stored, exit 3,
    suspect; its id."""
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir()
    code, result, stderr = _backup_json(ws)
    assert code == 3, stderr
    return str(result["id"])


def test_latest_passes_over_a_suspect_backup_and_prune_keeps_the_last_good_one(
        ws: Any, tmp_path: Path) -> None:
    """After a night with the uploads volume unmounted, ``restore latest`` restores the last
    trusted backup (and says which it passed over), and a manual ``prune`` with
    ``keep_last = 1`` keeps it. Before: ``latest`` was the empty backup, and prune deleted
    the last backup holding the files."""
    ws.write_config("[retention]\nkeep_last = 1\n")
    first = backup_ok(ws)
    suspect = _emptied_backup(ws)

    out = tmp_path / "restored"
    restore = ws.run("restore", "latest", "--only", "uploads", "--uploads-to", str(out),
                     "--json")
    assert restore.returncode == 0, restore.stderr
    assert json.loads(restore.stdout)["id"] == first
    assert f"passed over backup {suspect}: its uploads are suspect" in restore.stderr
    assert any(p.is_file() for p in out.rglob("*"))

    pruned = ws.run("prune")
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(complete_ids(ws)) == sorted([first, suspect])


def _corrupt(path: Path) -> bytes:
    """Flip one byte in the middle of ``path``; return what it held."""
    data = path.read_bytes()
    changed = bytearray(data)
    changed[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(changed))
    return data


def _restore_db_latest(ws: Any, name: str) -> subprocess.CompletedProcess[str]:
    return ws.run("restore", "latest", "--only", "database", "--to-database",
                  f"{ws.dbname}_{name}", "--json")


def test_latest_passes_over_a_backup_whose_every_copy_is_damaged(ws: Any,
                                                                  tmp_path: Path) -> None:
    """A verify found the newest backup's only copy corrupt: ``restore latest`` takes the
    one before (and says so); ``download latest`` takes the newest as it is, saying it is
    damaged, and fails on its bytes; with no good one left, ``restore latest`` is refused,
    not guessed."""
    first = backup_ok(ws)
    newest = backup_ok(ws)
    _corrupt(ws.backups / newest / "database.dump.zst")
    assert ws.run("verify", newest).returncode == 1

    restored = _restore_db_latest(ws, "a")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["id"] == first
    assert f"passed over backup {newest}: every copy is damaged" in restored.stderr
    fetched = ws.run("download", "latest", "--to", str(tmp_path / "a"))
    assert fetched.returncode != 0
    assert f"latest: backup {newest} taken as it is, though every copy is damaged" \
        in fetched.stderr

    _corrupt(ws.backups / first / "database.dump.zst")
    assert ws.run("verify", first).returncode == 1
    assert_error(_restore_db_latest(ws, "b"), 2, "no good backup to call 'latest'",
                 f"passed over backup {newest}: every copy is damaged")


def test_latest_depends_on_what_it_is_for(ws: Any, tmp_path: Path) -> None:
    """The newest backup has suspect uploads: ``restore latest --only database`` still takes
    it (its dump is fine), ``verify latest`` and ``download latest`` take it as it is and say
    so. Damaged by a flipped byte, ``restore latest --only database`` passes it over while
    ``verify latest`` re-checks it; repaired, that verify clears it and it is ``latest``
    again. Before: every use skipped it for the older backup, and a damaged newest backup
    could never be re-checked by the nightly ``verify latest``."""
    first = backup_ok(ws)
    suspect = _emptied_backup(ws)
    said = f"latest: backup {suspect} taken as it is, though its uploads are suspect"

    restored = _restore_db_latest(ws, "a")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["id"] == suspect and "passed over" not in restored.stderr
    verified = ws.run("verify", "latest", "--json")
    assert verified.returncode == 0, verified.stderr
    assert [c["id"] for c in json.loads(verified.stdout)["checks"]] == [suspect]
    assert said in verified.stderr
    fetched = ws.run("download", "latest", "--to", str(tmp_path / "dl"))
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.strip() == str(tmp_path / "dl" / suspect) and said in fetched.stderr

    dump = ws.backups / suspect / "database.dump.zst"
    original = _corrupt(dump)
    assert ws.run("verify", "latest").returncode == 1  # the newest, damaged or not
    restored = _restore_db_latest(ws, "b")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["id"] == first
    assert f"passed over backup {suspect}: every copy is damaged" in restored.stderr

    dump.write_bytes(original)
    assert ws.run("verify", "latest").returncode == 0  # re-checked: no longer damaged
    restored = _restore_db_latest(ws, "c")
    assert json.loads(restored.stdout)["id"] == suspect, restored.stderr


def _remove_two_in_three(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for i, path in enumerate(files):
        if i % 3:
            path.unlink()


def test_shrunken_uploads_folder_warns_against_the_previous_backup(ws: Any) -> None:
    """Two files in three gone since the previous complete backup: exit 3, the manifest says
    by how much; with ``max_shrink = 0.9`` the same drop is a normal backup."""
    first = backup_ok(ws)
    _remove_two_in_three(ws.uploads)

    code, result, stderr = _backup_json(ws)

    assert code == 3, stderr
    (warning,) = result["warnings"]
    assert f"shrank by more than 50% since backup {first} (files " in warning, warning
    manifest = json.loads((ws.backups / result["id"] / "manifest.json").read_text())
    assert manifest["warnings"] == [warning]

    ws.write_config()
    text = ws.config.read_text(encoding="utf-8")
    ws.config.write_text(text.replace("[uploads]\n", "[uploads]\nmax_shrink = 0.9\n"),
                         encoding="utf-8")
    backup_ok(ws)  # the same drop since the first (trusted) backup is within 90%


def test_a_shrunken_folder_warns_every_run_until_accepted(ws: Any) -> None:
    """An unmounted volume left unmounted keeps warning (and holding the prune back) night
    after night: a suspect backup is never the next one's yardstick. ``--accept-shrink``
    takes the smaller tree as intended, and later backups are compared with it."""
    first = backup_ok(ws)
    _remove_two_in_three(ws.uploads)

    for _ in range(2):
        code, result, stderr = _backup_json(ws)
        assert code == 3, stderr
        assert f"since backup {first}" in result["warnings"][0]
        assert all(p["skipped"] for p in result["pruned"]), result["pruned"]

    accepted = ws.run("backup", "--accept-shrink")
    assert accepted.returncode == 0, accepted.stderr
    assert "shrank" not in accepted.stderr
    backup_ok(ws)  # compared with the accepted backup now


def _uploads(files: int, nbytes: int) -> UploadsInfo:
    return UploadsInfo(path="/srv/uploads", files=files, bytes=nbytes, dirs=1, symlinks=0)


def test_shrink_warning_thresholds() -> None:
    before = ("B", _uploads(100, 1000))
    assert shrink_warning(_uploads(50, 500), before, 0.5) is None  # half: not *more* than half
    assert "(files 100 -> 49)" in str(shrink_warning(_uploads(49, 900), before, 0.5))
    assert "(bytes 1,000 -> 400)" in str(shrink_warning(_uploads(100, 400), before, 0.5))
    assert "since backup B" in str(shrink_warning(_uploads(10, 10), before, 0.5))
    assert shrink_warning(_uploads(10, 10), before, 1.0) is None  # 1: never on a shrink...
    assert "is empty" in str(shrink_warning(_uploads(0, 0), before, 1.0))  # ...but empty is
    assert "is empty" in str(shrink_warning(_uploads(0, 0), None, 0.5))  # the first backup too
    assert shrink_warning(_uploads(1, 1), None, 0.5) is None  # nothing to compare with
    assert shrink_warning(_uploads(99, 999), before, 0.0) is not None  # 0: any drop
    assert shrink_warning(_uploads(200, 5000), before, 0.0) is None  # growth never warns
    with pytest.raises(ValidationError):
        UploadsConfig(path=Path("/srv/uploads"), max_shrink=1.5)


# -- local targets: an unmounted backup disk --------------------------------------------------

def _local_target(ws: Any, path: Path, require_mount: str | None = None) -> None:
    ws.write_config()
    text = ws.config.read_text(encoding="utf-8").replace(f'"{ws.backups}"', f'"{path}"')
    if require_mount is not None:
        text += f"require_mount = {require_mount}\n"
    ws.config.write_text(text, encoding="utf-8")


def test_local_target_never_creates_missing_parents(ws: Any, tmp_path: Path) -> None:
    """/mnt/backup missing (not mounted, no mount point): no /mnt/backup/conexa on the root
    disk; the backup fails and says why."""
    disk = tmp_path / "backup disk"
    _local_target(ws, disk / "conexa")
    assert_error(ws.run("backup"), 1, f"{disk} does not exist", "mounted")
    assert not disk.exists()
    disk.mkdir()  # the folder's parent exists: the folder itself is created (0700)
    backup_ok(ws)
    assert stat.S_IMODE((disk / "conexa").stat().st_mode) == 0o700


def test_require_mount_at_a_mount_point(ws: Any, tmp_path: Path) -> None:
    """``require_mount = "<mount point>"``: nothing is written, listed or pruned there unless
    that folder is mounted; once mounted, backups land on the mounted disk."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _local_target(ws, mnt / "conexa", json.dumps(str(mnt)))
    assert_error(ws.run("backup"), 1, f"{mnt} is not mounted")
    assert list(mnt.iterdir()) == []  # the root disk under the mount point stays empty
    with tmpfs(mnt, "64m", mode="0755"):
        backup_id = backup_ok(ws)
        assert (mnt / "conexa" / backup_id / "manifest.json").is_file()
        assert complete_ids(ws) == [backup_id]
    assert list(mnt.iterdir()) == []
    assert_error(ws.run("list"), 1, "not mounted")
    assert_error(ws.run("backup"), 1, "not mounted")


def test_require_mount_true(ws: Any, tmp_path: Path) -> None:
    """``require_mount = true``: the folder must be on a mounted file system other than /."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _local_target(ws, mnt / "conexa", "true")
    with tmpfs(mnt, "64m", mode="0755"):
        backup_ok(ws)
    if _on_root_fs(tmp_path):  # else tmp_path is itself on a mounted disk (a tmpfs /tmp)
        assert_error(ws.run("backup"), 1, "is on the root file system", "mounted")
        assert list(mnt.iterdir()) == []


def _on_root_fs(path: Path) -> bool:
    return path.stat().st_dev == Path("/").stat().st_dev


def test_require_mount_must_hold_the_path(ws: Any, tmp_path: Path) -> None:
    _local_target(ws, tmp_path / "elsewhere" / "conexa", json.dumps(str(tmp_path / "mnt")))
    assert_error(ws.run("list"), 2, "require_mount")


# -- pg_dump and a table lock held by someone else --------------------------------------------

@pytest.mark.parametrize("dump_jobs", [1, 2])
def test_lock_wait_timeout_names_the_blocking_session(ws: Any, dump_jobs: int) -> None:
    """A migration holds ACCESS EXCLUSIVE on a table: with ``lock_wait_timeout = "1s"`` the
    backup fails within seconds instead of waiting, and the error names the session (pid,
    user, query start, its query)."""
    configure(ws, lock_wait_timeout="1s", dump_jobs=dump_jobs)
    with psycopg.connect(ws.cluster.url(ws.dbname)) as holder:  # a transaction stays open
        table = holder.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
            " WHERE schemaname = 'public' ORDER BY tablename LIMIT 1").fetchone()[0]
        pid, user = holder.execute("SELECT pg_backend_pid(), current_user").fetchone()
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        t0 = time.monotonic()
        result = ws.run("backup", timeout=120)
        took = time.monotonic() - t0
        holder.rollback()
    message = assert_error(result, 1, "lock_wait_timeout", f"table {table}",
                           f"pid {pid} (user {user}, query started 20",
                           f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    assert took < 60, f"{took:.1f} s: {message}"
    assert complete_ids(ws) == []
    backup_ok(ws)  # the lock is gone: the next run works


def test_lock_wait_timeout_reaches_pg_dump() -> None:
    config = DatabaseConfig(url="postgresql://u@db/conexa")
    assert config.lock_wait_timeout == "10m"
    info = postgres.conninfo(config)
    wait = parse_duration(config.lock_wait_timeout)
    assert postgres.pg_dump_argv(info, "snap-1", wait)[-2:] == [
        "--snapshot=snap-1", "--lock-wait-timeout=600000"]
    assert "--lock-wait-timeout=600000" in postgres.pg_dump_directory_argv(
        info, "snap-1", 4, Path("/staging/x"), wait)
    with pytest.raises(ValidationError, match="invalid duration"):
        DatabaseConfig(url="postgresql://u@db/conexa", lock_wait_timeout="10 minutes")
    # A statement timeout that is not pg_dump's lock wait (a role's statement_timeout hit
    # during COPY) is left as pg_dump's own error: no lock lookup.
    copy = ("pg_dump: error: Dumping the contents of table \"x\" failed: PQgetResult() failed.\n"
            "pg_dump: detail: Error message from server: ERROR:  canceling statement due to "
            "statement timeout\npg_dump: detail: Command was: COPY public.x (a) TO stdout;")
    assert postgres.lock_timeout_error(info, copy, "10m") is None


def test_row_counts_do_not_wait_behind_a_lock_either(ws: Any, tmp_path: Path) -> None:
    """The row counts (taken beside pg_dump, in its snapshot) give up after lock_wait_timeout
    too, and name the session: here pg_dump itself is held back until the lock is gone."""
    go = tmp_path / "go"
    hold = f'while [ ! -e {json.dumps(str(go))} ]; do sleep 0.05; done\nexec "$REAL" "$@"'
    configure(ws, lock_wait_timeout="1s", bin_dir=make_bin_dir(tmp_path / "bin", hold))
    url = ws.cluster.url(ws.dbname)
    with psycopg.connect(url) as holder, psycopg.connect(url, autocommit=True) as watcher:
        table, pid = holder.execute(
            "SELECT format('%I.%I', schemaname, tablename), pg_backend_pid() FROM pg_tables"
            " WHERE schemaname = 'public' ORDER BY tablename LIMIT 1").fetchone()
        holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

        def queued() -> bool:
            row = watcher.execute("SELECT count(*) FROM pg_locks WHERE NOT granted"
                                  " AND relation = to_regclass(%s)", (table,)).fetchone()
            return bool(row and row[0])

        proc = subprocess.Popen(cli_argv(ws, "backup"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        def looked_up() -> bool:  # the run logs the holder as soon as it has found it
            return any("counting rows waited" in p.read_text(encoding="utf-8", errors="replace")
                       for p in (ws.state / "logs").glob("*.log"))

        try:
            wait_for(queued, 60, "the row count to queue behind the lock")
            # Not merely "no longer queued": released before the run has looked its holder
            # up, the lock would be "held by a session that has ended since" (it happened
            # once, in a full suite run on a busy machine).
            wait_for(looked_up, 60, "the run to name the session holding the lock")
        finally:
            holder.rollback()
            go.touch()
            _, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_error(result, 1, "counting rows waited 1s (database.lock_wait_timeout)",
                 f"pid {pid} (user ", f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
    assert complete_ids(ws) == []
