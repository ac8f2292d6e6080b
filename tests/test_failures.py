"""Failure modes: every way a run can go wrong ends cleanly.

The contract (README, "Exit codes"): 0 ok, 1 failure, 2 usage or configuration error,
3 partial, 4 locked. An error is one clear line on stderr with no traceback unless
``--verbose``; a failed run leaves no partial files and never touches earlier backups; a
password never appears in argv, logs or output.

The CLI is driven as a real subprocess (``ws.run``) so that exit codes, stderr and child
processes are exactly what an operator or cron sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zstandard
from psycopg import sql

from conexa_backup import archive
from conexa_backup.state import runs
from conexa_backup.testing.cluster import find_bindir
from conexa_backup.testing.compare import plain_dump, tree_snapshot
from conexa_backup.testing.sample import make_uploads_tree
from tests.test_archive import make_deep_tree, remove_deep_tree

REAL_BIN = find_bindir()
REAL_PG_DUMP = REAL_BIN / "pg_dump"
_UNSET: Any = object()


# -- helpers ----------------------------------------------------------------------------------

def _q(value: object) -> str:
    """A TOML value: booleans and integers as such, anything else as a basic string (JSON
    string syntax is a subset TOML accepts, so any path or name is quoted correctly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)


def configure(ws: Any, *, url: str | None = None, uploads: Path | None = _UNSET,
              backups: Path | None = None, extra_targets: dict[str, Path] | None = None,
              **database: object) -> Path:
    """Write ``ws.config`` with values properly quoted (any path or name is allowed).

    ``database`` holds extra ``[database]`` keys (``bin_dir``, ``password_file``...).
    """
    lines = [f"state_dir = {_q(ws.state)}", "[database]",
             f"url = {_q(url or ws.cluster.url(ws.dbname))}"]
    lines += [f"{key} = {_q(value)}" for key, value in database.items()]
    uploads_path = ws.uploads if uploads is _UNSET else uploads
    if uploads_path is not None:
        # tar: these tests damage and inspect a tar backup's files (packs: test_*packs*.py)
        lines += ["[uploads]", f"path = {_q(uploads_path)}", 'format = "tar"']
    lines += ["[[targets]]", 'name = "local"', 'type = "local"',
              f"path = {_q(backups or ws.backups)}"]
    for name, path in (extra_targets or {}).items():
        lines += ["[[targets]]", f"name = {_q(name)}", 'type = "local"', f"path = {_q(path)}"]
    ws.config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ws.config


def cli_argv(ws: Any, *args: str) -> list[str]:
    return [sys.executable, "-m", "conexa_backup", "--config", str(ws.config), *args]


def assert_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit ``code``; stderr is an ``error:`` line naming ``words``; no traceback."""
    detail = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == code, detail
    assert "Traceback" not in result.stderr, detail
    starts = [m.start() for m in re.finditer(r"(?m)^error: ", result.stderr)]
    assert len(starts) == 1, detail
    message = result.stderr[starts[0]:]
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in the error\n{detail}"
    return message


def assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout


def backup_ok(ws: Any) -> str:
    """Run a backup that must succeed; return its id."""
    return assert_ok(ws.run("backup")).strip()


def listed(ws: Any) -> list[dict[str, Any]]:
    """``list --json``: exit 0, or exit 1 exactly when no backup listed is usable."""
    result = ws.run("list", "--json")
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    usable = any(e["status"] == "complete" or e["targets"] for e in entries)
    if entries and not usable:
        assert result.returncode == 1 and "has a usable copy" in result.stderr, result.stderr
        return entries
    assert_ok(result)
    return entries


def listed_by_id(ws: Any) -> dict[str, dict[str, Any]]:
    """``list --json`` by id (see :func:`listed` for its exit code)."""
    return {e["id"]: e for e in listed(ws)}


def complete_ids(ws: Any) -> list[str]:
    return [e["id"] for e in listed(ws) if e["status"] == "complete"]


def target_entries(backups: Path) -> set[str]:
    """Everything below the target folder, as relative paths (hidden files included)."""
    if not backups.exists():
        return set()
    return {p.relative_to(backups).as_posix() for p in backups.rglob("*")}


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".tmp-*")) if root.exists() else []


def database_exists(ws: Any, name: str) -> bool:
    return name in ws.cluster.databases()


def db_dump(ws: Any, name: str) -> str:
    return plain_dump(ws.cluster.env(), name)


def make_bin_dir(folder: Path, pg_dump_body: str) -> Path:
    """A ``bin_dir`` whose ``pg_dump`` is a bash script; the other tools are the real ones.

    ``pg_dump --version`` always answers like the real one, so a failure injected by
    ``pg_dump_body`` happens while dumping, not during the version check. The body may use
    ``$REAL`` (the real pg_dump).
    """
    folder.mkdir(parents=True)
    script = folder / "pg_dump"
    script.write_text(
        "#!/bin/bash\n"
        f"REAL={_q(REAL_PG_DUMP)}\n"
        'if [ "$1" = "--version" ]; then exec "$REAL" "$@"; fi\n'
        + pg_dump_body + "\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    for tool in ("pg_restore", "pg_dumpall", "psql"):
        (folder / tool).symlink_to(REAL_BIN / tool)
    return folder


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``marker`` (zombies have none)."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return found


def proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """``(pid, contents of /proc/<pid>/<name>)`` for every process we can read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                yield int(entry.name), (entry / name).read_bytes()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- configuration ----------------------------------------------------------------------------

def test_malformed_toml_names_file_and_line(ws: Any) -> None:
    ws.config.write_text(
        f'state_dir = "{ws.state}"\n'
        "[database]\n"
        'url = "postgresql://postgres@127.0.0.1/x"\n'
        "jobs = = 2\n",
        encoding="utf-8",
    )
    err = assert_error(ws.run("backup"), 2, str(ws.config), "line 4")
    assert len(err.strip().splitlines()) == 1, err
    assert not ws.backups.exists()


def test_unknown_key_names_the_key_path(ws: Any) -> None:
    configure(ws)
    text = ws.config.read_text(encoding="utf-8")
    ws.config.write_text(text.replace("[database]\n", "[database]\ncolour = \"blue\"\n"),
                         encoding="utf-8")
    err = assert_error(ws.run("backup"), 2, str(ws.config), "database.colour", "unknown key")
    assert "line 3" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not ws.backups.exists()


def test_unknown_key_in_a_target_names_its_index(ws: Any) -> None:
    configure(ws)
    with ws.config.open("a", encoding="utf-8") as fh:
        fh.write("bucket = \"oops\"\n")
    assert_error(ws.run("list"), 2, "targets.0.bucket", "unknown key")


def test_missing_config_file(ws: Any) -> None:
    ws.config.unlink()
    assert_error(ws.run("backup"), 2, str(ws.config), "not found")
    assert not ws.backups.exists()


# -- the database ----------------------------------------------------------------------------

def test_database_that_does_not_exist(ws: Any) -> None:
    missing = f"{ws.dbname}_missing"
    configure(ws, url=ws.cluster.url(missing))
    assert_error(ws.run("backup"), 1, missing, "does not exist")
    assert listed(ws) == []
    assert temp_files(ws.backups) == []


def test_role_that_does_not_exist(ws: Any) -> None:
    url = f"postgresql://nosuchrole@{ws.cluster.host}:{ws.cluster.port}/{ws.dbname}"
    configure(ws, url=url)
    assert_error(ws.run("backup"), 1, "nosuchrole", "does not exist")
    assert listed(ws) == []
    assert temp_files(ws.backups) == []


CRASH_BODY = (
    '"$REAL" "$@" | head -c 20000\n'
    'echo "simulated crash" >&2\n'
    "exit 3"
)


def test_pg_dump_dying_half_way(ws: Any, tmp_path: Path) -> None:
    first = backup_ok(ws)
    before = target_entries(ws.backups)
    configure(ws, bin_dir=make_bin_dir(tmp_path / "crashing bin", CRASH_BODY))

    err = assert_error(ws.run("backup"), 1, "pg_dump", "simulated crash")

    assert temp_files(ws.backups) == []
    # No new file anywhere (the leftover folder is covered by the test below).
    assert {e for e in target_entries(ws.backups) if "/" in e} == {
        e for e in before if "/" in e}, err
    assert [e["id"] for e in listed(ws)] == [first]
    assert_ok(ws.run("verify", first))


# -- uploads ---------------------------------------------------------------------------------

def test_missing_uploads_folder(ws: Any, tmp_path: Path) -> None:
    first = backup_ok(ws)
    ws.uploads.rename(tmp_path / "moved away")
    assert_error(ws.run("backup"), 1, str(ws.uploads))
    assert complete_ids(ws) == [first]
    assert temp_files(ws.backups) == []
    assert_ok(ws.run("verify", first))


def test_error_message_keeps_square_brackets(ws: Any, tmp_path: Path) -> None:
    gone = tmp_path / "uploads[old]"
    configure(ws, uploads=gone)
    assert_error(ws.run("backup"), 1, str(gone))


def test_error_message_with_markup_like_path_has_no_traceback(ws: Any, tmp_path: Path) -> None:
    gone = tmp_path / "a[/x]b"
    configure(ws, uploads=gone)
    assert_error(ws.run("backup"), 1, "does not exist")


# -- the target ------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str, mode: str = "1777") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on ``mountpoint`` for the block (root can mount here;
    the test is skipped where it cannot): a disk that fills up, or one that can be unmounted."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs",
                           str(mountpoint)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True,
                          check=False).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "full disk", "1m") as mnt:
        yield mnt


def test_full_disk(ws: Any, tmp_path: Path, small_tmpfs: Path) -> None:
    big = tmp_path / "big uploads"
    make_uploads_tree(big, files=100, seed=3, incompressible_kib=128)
    configure(ws, uploads=big, backups=small_tmpfs / "backups")

    assert_error(ws.run("backup"), 1, "no space left")

    assert temp_files(small_tmpfs) == []
    assert complete_ids(ws) == []


# -- the lock --------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from conexa_backup.locking import run_lock
with run_lock(Path(sys.argv[1]), "test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


@contextlib.contextmanager
def lock_held(state_dir: Path, script: str = HOLDER) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the run lock in ``state_dir``, as a CLI run would
    (``script`` takes it, prints ``locked``, then waits)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script, str(state_dir)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_lock_held_then_holder_killed(ws: Any) -> None:
    ws.state.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws.state)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        assert_error(ws.run("backup"), 4, "lock", f"pid {holder.pid}")
        assert target_entries(ws.backups) == set()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    backup_id = backup_ok(ws)
    assert complete_ids(ws) == [backup_id]


# -- a run killed mid-way --------------------------------------------------------------------

def test_backup_killed_mid_way(ws: Any, tmp_path: Path) -> None:
    started = tmp_path / "pg_dump streaming"
    body = f'"$REAL" "$@" | {{ head -c 20000; touch {_q(started)}; sleep 2; cat; }}'
    configure(ws, bin_dir=make_bin_dir(tmp_path / "slow bin", body))
    marker = f"conexa-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(cli_argv(ws, "backup"), env={**os.environ, "CONEXA_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(started.exists, 20, "pg_dump to stream its first bytes")
        assert temp_files(ws.backups), "the dump should be in progress"
        assert len(processes_with_env(marker)) >= 3  # us, the wrapper, pg_dump...
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    assert complete_ids(ws) == []
    # With our end of its pipe gone, pg_dump (and its wrapper) end on their own.
    wait_for(lambda: not processes_with_env(marker), 8, "pg_dump to exit")

    configure(ws)
    backup_id = backup_ok(ws)
    assert complete_ids(ws) == [backup_id]
    assert_ok(ws.run("verify", backup_id))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_backup_stopped_by_a_signal_cleans_up(ws: Any, tmp_path: Path, sig: int) -> None:
    """SIGTERM/SIGINT: stop cleanly, remove partial files, say so, exit 143/130."""
    first = backup_ok(ws)
    started = tmp_path / "pg_dump streaming"
    body = f'"$REAL" "$@" | {{ head -c 20000; touch {_q(started)}; sleep 5; cat; }}'
    configure(ws, bin_dir=make_bin_dir(tmp_path / "slow bin", body))
    marker = f"conexa-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(cli_argv(ws, "backup"), env={**os.environ, "CONEXA_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(started.exists, 20, "pg_dump to stream its first bytes")
    assert temp_files(ws.backups), "the dump should be in progress"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig  # 143 / 130, as a shell reports a signalled command
    assert f"interrupted by {signal.Signals(sig).name}" in stderr and "Traceback" not in stderr
    assert temp_files(ws.backups) == []
    assert complete_ids(ws) == [first]
    assert {p.name for p in ws.backups.iterdir()} == {first}  # no leftover folder
    wait_for(lambda: not processes_with_env(marker), 8, "pg_dump to exit")
    log = "".join(p.read_text() for p in (ws.state / "logs").iterdir())
    assert "interrupted" in log


# -- awkward names ---------------------------------------------------------------------------

def test_names_with_spaces_quotes_and_shell_metacharacters(ws: Any, tmp_path: Path) -> None:
    pwned = Path("/tmp/pwned")
    pwned.unlink(missing_ok=True)
    source_db = f"{ws.dbname} \"x\" $(touch /tmp/pwned) ; 'y'"
    restored_db = f"{ws.dbname} `touch /tmp/pwned` \"z\"; $HOME 'q'"
    ws.cluster.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(source_db), sql.Identifier(ws.dbname)))
    uploads = tmp_path / "up \"loads\" $(touch \\tmp\\pwned) ; 'it''s' $HOME & |x|"
    ws.uploads.rename(uploads)
    restored_uploads = tmp_path / "restored \"u\" `touch x` ; $(id) 'v' *"
    configure(ws, url=ws.cluster.url(source_db), uploads=uploads)

    backup_id = backup_ok(ws)
    assert_ok(ws.run("restore", backup_id, "--to-database", restored_db,
                     "--uploads-to", str(restored_uploads), "--yes"))

    assert db_dump(ws, restored_db) == db_dump(ws, source_db)
    assert tree_snapshot(restored_uploads) == tree_snapshot(uploads)
    assert not pwned.exists()


def test_restore_into_database_name_with_equals_sign(ws: Any, tmp_path: Path) -> None:
    backup_id = backup_ok(ws)
    target = f"{ws.dbname} copy=1"
    assert_ok(ws.run("restore", backup_id, "--only", "database", "--to-database", target,
                     "--yes"))
    assert db_dump(ws, target) == db_dump(ws, ws.dbname)


def test_restore_never_drops_a_database_it_did_not_create(ws: Any) -> None:
    """The target name is checked free before the fetch; if someone takes it before CREATE
    DATABASE runs, the restore fails and leaves their database alone."""
    from conexa_backup import postgres
    from conexa_backup.actions import restore_db
    from conexa_backup.config import load_config
    from conexa_backup.errors import DatabaseError
    from conexa_backup.manifest import Manifest

    backup_id = backup_ok(ws)
    manifest = Manifest.from_json((ws.backups / backup_id / "manifest.json").read_bytes(), "t")
    assert manifest.database is not None
    theirs = f"{ws.dbname}_theirs"
    ws.cluster.create_database(theirs)
    ws.cluster.execute("CREATE TABLE keep_me (id int)", dbname=theirs)
    info = postgres.conninfo(load_config(ws.config)[0].database)

    with pytest.raises(DatabaseError, match="cannot create database"):
        restore_db.restore_into(info, ws.root / "never-read.dump", manifest.database, theirs)
    assert database_exists(ws, theirs)
    with ws.cluster.connect(theirs) as conn:
        assert conn.execute("SELECT count(*) FROM keep_me").fetchone() == (0,)


# -- secrets ---------------------------------------------------------------------------------

def test_password_never_in_argv_logs_or_output(ws: Any, tmp_path: Path) -> None:
    password = f"Zebra-{uuid.uuid4().hex[:12]}-pw"
    pw_file = tmp_path / "pgpass secret"
    pw_file.write_text(password + "\n", encoding="utf-8")
    pw_file.chmod(0o600)
    # pg_dump lingers a little so the poll below surely sees it; roles are dumped too.
    slow = make_bin_dir(tmp_path / "bin", 'sleep 0.5\nexec "$REAL" "$@"')
    configure(ws, password_file=pw_file, bin_dir=slow, globals=True)
    needle = password.encode()

    proc = subprocess.Popen(cli_argv(ws, "--verbose", "backup"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    in_argv: list[tuple[int, bytes]] = []
    in_env: set[int] = set()
    with proc:
        while proc.poll() is None:
            in_argv += [(pid, cmd) for pid, cmd in proc_files("cmdline") if needle in cmd]
            in_env |= {pid for pid, env in proc_files("environ") if needle in env}
        out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert in_argv == []
    # The control: the password did travel to the children (in their environment).
    assert in_env - {proc.pid}, "never saw a child holding the password"
    assert needle not in out
    assert needle not in err

    for log in (ws.state / "logs").iterdir():
        assert needle not in log.read_bytes(), log
    listing = ws.run("list", "--json")
    assert password not in listing.stdout + listing.stderr


def test_password_in_url_not_echoed_on_error(ws: Any) -> None:
    secret = f"SECRETPW{uuid.uuid4().hex[:8]}"
    url = f"postgresql://postgres:{secret}@{ws.cluster.host}:{ws.cluster.port}/nope"
    configure(ws, url=url)
    result = ws.run("backup")
    assert_error(result, 1, "nope")
    assert secret not in result.stdout + result.stderr
    verbose = ws.run("--verbose", "backup")
    assert verbose.returncode == 1
    assert secret not in verbose.stdout + verbose.stderr
    for log in (ws.state / "logs").iterdir():
        assert secret not in log.read_text(encoding="utf-8"), log


# -- refusals --------------------------------------------------------------------------------

def test_restore_unknown_id(ws: Any) -> None:
    backup_ok(ws)
    assert_error(ws.run("restore", "20200101T000000Z", "--yes"), 2, "20200101T000000Z")


def test_restore_without_yes_on_a_non_tty_changes_nothing(ws: Any) -> None:
    backup_id = backup_ok(ws)
    dump, tree = db_dump(ws, ws.dbname), tree_snapshot(ws.uploads)
    dbs = ws.cluster.databases()

    assert_error(ws.run("restore", backup_id), 2, "--yes")

    assert db_dump(ws, ws.dbname) == dump
    assert tree_snapshot(ws.uploads) == tree
    assert ws.cluster.databases() == dbs
    assert [e["id"] for e in listed(ws)] == [backup_id]  # no safety backup either


def test_delete_without_yes(ws: Any) -> None:
    backup_id = backup_ok(ws)
    before = target_entries(ws.backups)
    assert_error(ws.run("delete", backup_id), 2, "--yes")
    assert target_entries(ws.backups) == before
    assert complete_ids(ws) == [backup_id]


def test_restore_to_existing_database_is_refused(ws: Any) -> None:
    backup_id = backup_ok(ws)
    other = f"{ws.dbname}_other"
    ws.cluster.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
        sql.Identifier(other), sql.Identifier(ws.dbname)))
    with psycopg.connect(ws.cluster.url(other), autocommit=True) as conn:
        conn.execute("CREATE TABLE marker (v text)")
        conn.execute("INSERT INTO marker VALUES ('untouched')")
    dump = db_dump(ws, other)

    assert_error(ws.run("restore", backup_id, "--only", "database", "--to-database", other,
                        "--yes"), 2, other, "already exists")

    assert db_dump(ws, other) == dump


# -- damaged backups -------------------------------------------------------------------------

def _flip_middle(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_database_artifact(ws: Any, tmp_path: Path) -> None:
    backup_id = backup_ok(ws)
    _flip_middle(ws.backups / backup_id / "database.dump.zst")

    result = ws.run("verify", backup_id)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "database.dump.zst" in result.stdout + result.stderr
    assert "local" in result.stdout + result.stderr

    target = f"{ws.dbname}_from_corrupt"
    assert_error(ws.run("restore", backup_id, "--only", "database", "--to-database", target,
                        "--yes"), 1, backup_id)
    assert not database_exists(ws, target)
    assert list((ws.state / "staging").glob("*")) == []


def test_truncated_uploads_archive(ws: Any, tmp_path: Path) -> None:
    backup_id = backup_ok(ws)
    archive = ws.backups / backup_id / "uploads.tar.zst"
    with archive.open("r+b") as fh:
        fh.truncate(archive.stat().st_size // 2)

    result = ws.run("verify", backup_id)
    assert result.returncode == 1
    assert "uploads.tar.zst" in result.stdout + result.stderr

    dest = tmp_path / "restored uploads"
    target = f"{ws.dbname}_half"
    assert_error(ws.run("restore", backup_id, "--to-database", target,
                        "--uploads-to", str(dest), "--yes"), 1, "uploads", "damaged")
    assert not dest.exists()
    assert not database_exists(ws, target)  # the database part was undone too
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _replace_uploads_archive(ws: Any, backup_id: str, members: list[tarfile.TarInfo]) -> None:
    """Store an intact uploads archive holding ``members`` (no data) in the local copy, the
    manifest's checksum updated to match: a copy no checksum can fault."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            tar.addfile(member)
    data = zstandard.ZstdCompressor().compress(raw.getvalue())
    (ws.backups / backup_id / "uploads.tar.zst").write_bytes(data)
    path = ws.backups / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    artifact = next(a for a in manifest["artifacts"] if a["kind"] == "uploads")
    artifact.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    path.write_text(json.dumps(manifest))


def test_intact_copy_that_cannot_be_restored_says_why_not_no_good_copy(
        ws: Any, tmp_path: Path) -> None:
    """"No good copy" means damaged or missing copies only. Before: "no good copy: ...
    refusing archive member" although the copy was intact."""
    backup_id = backup_ok(ws)
    link = tarfile.TarInfo("shortcut")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    through = tarfile.TarInfo("shortcut/pwned")
    _replace_uploads_archive(ws, backup_id, [link, through])
    assert_ok(ws.run("verify", backup_id))  # intact, as far as checksums can tell
    dest = tmp_path / "restored"
    message = assert_error(ws.run("restore", backup_id, "--only", "uploads", "--uploads-to",
                                  str(dest), "--yes"), 1,
                           "'local'", "uploads.tar.zst (stored bytes match the manifest)",
                           "refusing archive member 'shortcut/pwned'", "passes through")
    assert "no good copy" not in message
    assert not dest.exists() and not Path("/etc/pwned").exists()


# -- files the backup user cannot read ---------------------------------------------------------

def _unprivileged() -> tuple[list[str], str]:
    """A command prefix for a user for whom file permissions hold, and who owns its files:
    ``postgres`` (not root), or, where that user cannot run this venv's python, root stripped
    for good of the capabilities that bypass file permissions (DAC override and read-search)."""
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
    probe = subprocess.run([*as_postgres, sys.executable, "-c", "import conexa_backup"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        return as_postgres, "postgres"
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"], "root"


@pytest.fixture
def shared_ws(ws: Any) -> Iterator[Any]:
    """``ws`` in a folder owned by the user of ``ws.prefix`` (pytest's tmp dirs are root's
    only), with ``ws.prefix`` the command prefix that runs as that user."""
    home = Path(tempfile.mkdtemp(prefix="conexa-unreadable-"))
    try:
        shutil.copytree(ws.uploads, home / "uploads", symlinks=True)
        ws.uploads, ws.state, ws.backups = home / "uploads", home / "state", home / "backups"
        ws.config = home / "backup.toml"
        configure(ws)
        ws.prefix, user = _unprivileged()
        subprocess.run(["chown", "-R", f"{user}:{user}", str(home)], check=True)
        yield ws
    finally:
        shutil.rmtree(home)


def _run_as(ws: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as ``shared_ws``'s unprivileged user (``ws.prefix``: setpriv)."""
    return subprocess.run([*ws.prefix, *cli_argv(ws, *args)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ, "HOME": str(ws.state.parent)})


def test_unreadable_upload_is_skipped_and_the_run_is_partial(shared_ws: Any,
                                                            tmp_path: Path) -> None:
    """Before: "cannot read .../extrato.csv: Permission denied", exit 1, nothing stored (the
    database included), although `check` said the uploads were readable."""
    ws = shared_ws
    (ws.uploads / "financeiro" / "extrato.csv").chmod(0)
    (ws.uploads / "fotos").chmod(0)
    expected = {"financeiro/extrato.csv": "cannot read: Permission denied",
                "fotos": "cannot list folder: Permission denied"}

    checked = _run_as(ws, "check", "--json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    uploads = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "uploads")
    assert not uploads["ok"] and "opened all" in uploads["detail"]
    assert all(f"{p} ({why})" in uploads["detail"] for p, why in expected.items()), uploads

    backup = _run_as(ws, "backup", "--json")
    assert backup.returncode == 3, backup.stdout + backup.stderr
    report = json.loads(backup.stdout)
    assert report["status"] == "partial" and len(report["warnings"]) == 1
    assert "uploads: 2 entries not backed up" in report["warnings"][0]
    assert backup.stderr.count("\n") == 1 and "2 entries not backed up" in backup.stderr
    manifest = json.loads((ws.backups / report["id"] / "manifest.json").read_text())
    assert manifest["uploads"]["skipped"] == 2
    assert {e["path"]: e["reason"] for e in manifest["uploads"]["skipped_paths"]} == expected
    assert {a["kind"] for a in manifest["artifacts"]} >= {"database", "uploads"}
    assert runs(ws.state)[-1]["outcome"] == "partial"  # what the alert says

    dest = tmp_path / "restored"  # what was readable comes back
    assert_ok(ws.run("restore", report["id"], "--only", "uploads", "--uploads-to", str(dest),
                     "--yes"))
    assert (dest / "financeiro").is_dir() and not (dest / "financeiro" / "extrato.csv").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in ws.uploads.iterdir())


def test_unreadable_upload_with_a_latin1_name_is_named_printably(shared_ws: Any,
                                                                 tmp_path: Path) -> None:
    """Before: the whole run failed after every upload had finished, on the manifest's JSON
    ("surrogates not allowed"): the name is shown with \\xe9 escapes; its readable Latin-1
    neighbour comes back under the same bytes."""
    ws = shared_ws
    (ws.uploads / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"readable")
    secret = ws.uploads / os.fsdecode(b"d\xe9p\xf4t.txt")
    secret.write_bytes(b"unreadable")
    subprocess.run(["chown", "--reference", str(ws.uploads), str(ws.uploads / os.fsdecode(
        b"caf\xe9.txt")), str(secret)], check=True)
    secret.chmod(0)
    shown = {"d\\xe9p\\xf4t.txt": "cannot read: Permission denied"}

    checked = _run_as(ws, "check", "--json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    uploads = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "uploads")
    assert "d\\xe9p\\xf4t.txt (cannot read: Permission denied)" in uploads["detail"], uploads
    backup = _run_as(ws, "backup", "--json")
    assert backup.returncode == 3, backup.stdout + backup.stderr
    report = json.loads(backup.stdout)
    assert "d\\xe9p\\xf4t.txt (cannot read" in report["warnings"][0]
    manifest = json.loads((ws.backups / report["id"] / "manifest.json").read_text())
    assert {e["path"]: e["reason"] for e in manifest["uploads"]["skipped_paths"]} == shown
    dest = tmp_path / "restored"
    assert_ok(ws.run("restore", report["id"], "--only", "uploads", "--uploads-to", str(dest),
                     "--yes"))
    assert b"caf\xe9.txt" in os.listdir(os.fsencode(dest))
    assert b"d\xe9p\xf4t.txt" not in os.listdir(os.fsencode(dest))
    assert (dest / os.fsdecode(b"caf\xe9.txt")).read_bytes() == b"readable"


def test_uploads_too_deep_are_skipped_and_the_run_is_partial(ws: Any) -> None:
    """Before: a tree about 495 folders deep raised RecursionError in the walk: a traceback,
    and the whole backup lost, database included. Now the folders past the walk's depth limit
    are stored empty, named, and the run is partial."""
    limit = archive._max_depth()
    make_deep_tree(ws.uploads / "deep", limit)
    try:
        deepest = "deep/" + "/".join(["a"] * limit)
        why = f"cannot list folder: more than {limit} levels deep"
        checked = ws.run("check", "--json")
        assert checked.returncode == 1, checked.stdout + checked.stderr
        uploads = next(c for c in json.loads(checked.stdout)["checks"]
                       if c["name"] == "uploads")
        assert f"{deepest} ({why})" in uploads["detail"]
        backup = ws.run("backup", "--json")
        assert backup.returncode == 3, backup.stdout + backup.stderr
        assert "Traceback" not in backup.stderr
        report = json.loads(backup.stdout)
        assert "uploads: 1 entry not backed up" in report["warnings"][0], report["warnings"]
        manifest = json.loads((ws.backups / report["id"] / "manifest.json").read_text())
        assert manifest["uploads"]["skipped_paths"] == [{"path": deepest, "reason": why}]
        assert {a["kind"] for a in manifest["artifacts"]} >= {"database", "uploads"}
    finally:
        remove_deep_tree(ws.uploads / "deep")  # pytest's rmtree recurses once per level


# -- tracebacks are a choice -----------------------------------------------------------------

def test_verbose_shows_the_traceback(ws: Any) -> None:
    configure(ws, url=ws.cluster.url(f"{ws.dbname}_missing"))
    quiet = ws.run("backup")
    assert quiet.returncode == 1
    assert "Traceback" not in quiet.stderr
    verbose = ws.run("--verbose", "backup")
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr
    assert "does not exist" in verbose.stderr


# -- failed runs leave nothing behind --------------------------------------------------------

@pytest.mark.parametrize("failure", [
    "missing database", "pg_dump crash", "missing uploads", "full disk"])
def test_failed_backup_leaves_no_backup_folder(ws: Any, tmp_path: Path, failure: str,
                                               request: pytest.FixtureRequest) -> None:
    if failure == "full disk":
        backups = request.getfixturevalue("small_tmpfs") / "backups"
        big = tmp_path / "big uploads"
        make_uploads_tree(big, files=100, seed=3, incompressible_kib=128)
        configure(ws, uploads=big, backups=backups)
    else:
        backups = ws.backups
        backup_ok(ws)
        if failure == "missing database":
            configure(ws, url=ws.cluster.url(f"{ws.dbname}_missing"))
        elif failure == "pg_dump crash":
            configure(ws, bin_dir=make_bin_dir(tmp_path / "bin", CRASH_BODY))
        else:
            ws.uploads.rename(tmp_path / "moved away")
    before = target_entries(backups)
    assert ws.run("backup").returncode == 1
    assert target_entries(backups) == before


@pytest.mark.parametrize("damage", [
    "flipped database",
    "flipped uploads",
    "truncated uploads",
])
def test_restore_falls_back_to_the_good_copy(ws: Any, tmp_path: Path, damage: str) -> None:
    second = tmp_path / "second target"
    configure(ws, extra_targets={"second": second})
    backup_id = backup_ok(ws)
    kind, _, part = damage.partition(" ")
    artifact = ws.backups / backup_id / {"database": "database.dump.zst",
                                         "uploads": "uploads.tar.zst"}[part]
    if kind == "flipped":
        _flip_middle(artifact)
    else:
        with artifact.open("r+b") as fh:
            fh.truncate(artifact.stat().st_size // 2)

    target, dest = f"{ws.dbname}_fallback", tmp_path / "fallback uploads"
    restored = ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                      "--yes")
    assert_ok(restored)
    assert db_dump(ws, target) == db_dump(ws, ws.dbname)
    assert tree_snapshot(dest) == tree_snapshot(ws.uploads)
    event = runs(ws.state)[-1]
    assert event["kind"] == "restore" and event["outcome"] == "success"
    warnings = [line for line in restored.stderr.splitlines() if line.startswith("warning: ")]
    if kind == "truncated":  # the listing shows the size wrong: known damaged, never read
        assert warnings == [] and "fallback" not in event["title"], restored.stderr
    else:
        # Passing over the damaged copy is said on stderr and in the restore event.
        why = f"used the copy on 'second' because target 'local': {backup_id}/{artifact.name}"
        assert len(warnings) == 1 and why in warnings[0], restored.stderr
        assert "fallback" in event["title"] and why in event["details"]["fallbacks"]
    bad = ws.run("verify", backup_id)
    assert bad.returncode == 1
    assert "local" in bad.stdout and artifact.name in bad.stdout

    # The copy is now known damaged: the next restore reads the good one first, with no
    # download of the bad one and no fallback. Before: the damaged copy was always tried first.
    again = ws.run("restore", backup_id, "--to-database", f"{target}_2", "--uploads-to",
                   str(tmp_path / "again"), "--yes")
    assert_ok(again)
    assert "warning: " not in again.stderr, again.stderr
    assert "fallback" not in runs(ws.state)[-1]["title"]


# -- one line, once ----------------------------------------------------------------------------

ERROR_ONCE_REASON = (
    "_guard logs the error to the 'conexa_backup' logger after _session has already removed "
    "the file handler (stop_file_logs), so the logger has no handler and Python's "
    "logging.lastResort prints the bare message to stderr a second time; fix: give the "
    "'conexa_backup' logger a logging.NullHandler (logs.py) and log the failure inside "
    "_session before the file log is closed")


@pytest.mark.parametrize("case", ["missing config", "unknown id", "missing database"])
def test_error_is_exactly_one_line_on_stderr(ws: Any, case: str) -> None:
    if case == "missing config":
        ws.config.unlink()
        result = ws.run("list")
    elif case == "unknown id":
        result = ws.run("restore", "20200101T000000Z", "--yes")
    else:
        configure(ws, url=ws.cluster.url(f"{ws.dbname}_missing"))
        result = ws.run("backup")
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_failure_reason_is_in_the_log_file(ws: Any) -> None:
    missing = f"{ws.dbname}_missing"
    configure(ws, url=ws.cluster.url(missing))
    assert ws.run("backup").returncode == 1
    logs = "".join(p.read_text(encoding="utf-8") for p in (ws.state / "logs").iterdir())
    assert missing in logs and "does not exist" in logs, logs
