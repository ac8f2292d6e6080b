"""Small units: connection settings, manifests, the catalog, the run lock, child processes."""

from __future__ import annotations

import logging
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from conexa_backup import postgres, process
from conexa_backup.catalog import Backup, Copy, Use, read_manifest, resolve, scan
from conexa_backup.config import DatabaseConfig
from conexa_backup.errors import (
    ConfigError,
    ExitCode,
    IntegrityError,
    LockedError,
    ObjectNotFoundError,
    ProcessError,
    UsageError,
)
from conexa_backup.locking import LOCK_NAME, run_lock
from conexa_backup.manifest import (
    FORMAT_VERSION,
    ID_PATTERN,
    MANIFEST_NAME,
    Artifact,
    DatabaseInfo,
    Manifest,
    UploadsInfo,
    id_sort_key,
    new_backup_id,
)
from conexa_backup.scratch import abandoned, scratch_name
from conexa_backup.state import sweep_stale
from conexa_backup.storage.local import LocalTarget, LocalTargetConfig

SECRET = "Sup3r-s3cret!pw"


# =================================================================================================
# postgres.conninfo
# =================================================================================================

def db_config(url: str, **kwargs: object) -> DatabaseConfig:
    return DatabaseConfig(url=url, **kwargs)  # type: ignore[arg-type]


def all_argv(info: postgres.ConnInfo) -> list[str]:
    return [
        *postgres.pg_dump_argv(info, "00000003-00000002-1"),
        *postgres.pg_dump_argv(info, None),
        *postgres.pg_restore_argv(info, Path("/var/lib/cb/staging/x.dump"), "conexa_new", 4),
        *postgres.pg_dumpall_globals_argv(info, superuser=True),
        *postgres.pg_dumpall_globals_argv(info, superuser=False),
    ]


def test_conninfo_params_from_url() -> None:
    info = postgres.conninfo(db_config(
        "postgresql://backup@db.internal:5433/conexa?sslmode=require&application_name=cb",
        jobs=6, maintenance_database="template1", bin_dir=Path("/opt/pg/bin")))
    assert info.params == {"user": "backup", "host": "db.internal", "port": "5433",
                           "dbname": "conexa", "sslmode": "require", "application_name": "cb"}
    assert info.dbname == "conexa"
    assert (info.jobs, info.maintenance_db, info.bin_dir) == (6, "template1", Path("/opt/pg/bin"))
    assert info.tool("pg_dump") == "/opt/pg/bin/pg_dump"
    env = info.env()
    assert env["PGHOST"] == "db.internal"
    assert env["PGPORT"] == "5433"
    assert env["PGUSER"] == "backup"
    assert env["PGDATABASE"] == "conexa"
    assert env["PGSSLMODE"] == "require"
    assert env["PGAPPNAME"] == "cb"
    assert info.env("postgres")["PGDATABASE"] == "postgres"
    assert "PGPASSWORD" not in env


def test_conninfo_percent_encoded_names() -> None:
    info = postgres.conninfo(db_config("postgresql://u@%2Fvar%2Frun%2Fpostgresql/escola%20nova"))
    assert info.params["host"] == "/var/run/postgresql"
    assert info.dbname == "escola nova"


def test_password_from_url_goes_to_env_only() -> None:
    info = postgres.conninfo(db_config(f"postgresql://backup:{SECRET}@db/conexa"))
    assert info.env()["PGPASSWORD"] == SECRET
    assert not any(SECRET in arg for arg in all_argv(info))


def test_password_file(tmp_path: Path) -> None:
    pw = tmp_path / "db-password"
    pw.write_text(f"{SECRET}\n", encoding="utf-8")
    info = postgres.conninfo(db_config("postgresql://backup@db/conexa", password_file=pw))
    assert info.params["password"] == SECRET  # trailing newline stripped
    assert info.env()["PGPASSWORD"] == SECRET
    assert info.env("other")["PGPASSWORD"] == SECRET
    argv = all_argv(info)
    assert "--no-password" in argv
    assert not any(SECRET in arg for arg in argv)
    assert SECRET not in info.describe()
    assert SECRET not in repr(process.format_argv(argv))


def test_password_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"database\.password_file: cannot read .*nope"):
        postgres.conninfo(db_config("postgresql://backup@db/conexa", password_file=missing))


def test_password_file_overrides_url_password(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file", encoding="utf-8")
    info = postgres.conninfo(db_config("postgresql://u:from-url@db/conexa", password_file=pw))
    assert info.env()["PGPASSWORD"] == "from-file"


def test_unsupported_url_parameter() -> None:
    with pytest.raises(ConfigError, match=r"unsupported parameter.*keepalives") as info:
        postgres.conninfo(db_config(f"postgresql://u:{SECRET}@db/conexa?keepalives=1"))
    assert SECRET not in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


def test_unknown_url_parameter() -> None:
    with pytest.raises(ConfigError, match=r"database\.url") as info:
        postgres.conninfo(db_config(f"postgresql://u:{SECRET}@db/conexa?colour=blue"))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url", ["postgresql://u@db", "postgresql://u@db/",
                                 "postgresql://u@db:5432"])
def test_url_without_dbname(url: str) -> None:
    with pytest.raises(ConfigError, match="must name a database"):
        postgres.conninfo(db_config(url))


def test_redact() -> None:
    info = postgres.conninfo(db_config(f"postgresql://u:{SECRET}@db/conexa?sslpassword=keypw"))
    message = f'FATAL: password "{SECRET}" rejected for u; key keypw; again {SECRET}'
    redacted = postgres.redact(message, info)
    assert SECRET not in redacted
    assert "keypw" not in redacted
    assert redacted.count("********") == 3
    assert redacted.startswith("FATAL: password")


def test_redact_without_password_is_identity() -> None:
    info = postgres.conninfo(db_config("postgresql://u@db/conexa"))
    assert postgres.redact("nothing secret", info) == "nothing secret"


def test_describe_never_shows_password() -> None:
    info = postgres.conninfo(db_config(f"postgresql://backup:{SECRET}@db.internal:5433/conexa"))
    text = info.describe()
    assert SECRET not in text
    assert text == "database 'conexa' at backup@db.internal:5433"
    assert info.describe("postgres") == "database 'postgres' at backup@db.internal:5433"
    default = postgres.conninfo(db_config("postgresql:///conexa"))
    assert default.describe() == "database 'conexa' at localhost:5432"


def test_argv_shapes() -> None:
    info = postgres.conninfo(db_config("postgresql://u@db/conexa", bin_dir=Path("/pg")))
    assert postgres.pg_dump_argv(info, "snap-1") == [
        "/pg/pg_dump", "--format=custom", "--compress=0", "--no-password", "--snapshot=snap-1"]
    assert "--no-role-passwords" in postgres.pg_dumpall_globals_argv(info, superuser=False)
    assert "--no-role-passwords" not in postgres.pg_dumpall_globals_argv(info, superuser=True)
    restore = postgres.pg_restore_argv(info, Path("/s/x.dump"), "conexa_restored", 3)
    assert restore[0] == "/pg/pg_restore"
    assert "--exit-on-error" in restore and "--jobs=3" in restore
    assert "--dbname=dbname=conexa_restored" in restore and restore[-1] == "/s/x.dump"


# =================================================================================================
# manifest
# =================================================================================================

SHA = "ab" * 32


def make_manifest(backup_id: str, kind: str = "scheduled") -> Manifest:
    start = datetime(2026, 3, 1, 2, 15, tzinfo=UTC)
    return Manifest(
        id=backup_id, kind=kind, tool_version="0.1.0", hostname="escola-01",  # type: ignore[arg-type]
        started_at=start, finished_at=start + timedelta(minutes=3),
        database=DatabaseInfo(name="conexa", server_version="16.4", pg_dump_version="16.4",
                              encoding="UTF8", collate="C.UTF-8", ctype="C.UTF-8",
                              owner="conexa", tables={"public.students": 120,
                                                      'public."Observações"': 7}),
        uploads=UploadsInfo(path="/srv/uploads", files=60, bytes=123_456, dirs=9, symlinks=2),
        artifacts=[
            Artifact(name="database.dump.zst", kind="database", size=1000, sha256=SHA,
                     compression="zstd", content="pg_dump-custom"),
            Artifact(name="uploads.tar.zst", kind="uploads", size=2345, sha256="cd" * 32,
                     compression="zstd", content="tar"),
        ],
    )


def test_new_backup_id_format() -> None:
    now = datetime(2026, 11, 30, 2, 15, 7, 999_999, tzinfo=UTC)
    backup_id = new_backup_id(now, set())
    assert backup_id == "20261130T021507Z"
    assert ID_PATTERN.match(backup_id)


def test_new_backup_id_is_utc() -> None:
    brasilia = timezone(timedelta(hours=-3))
    now = datetime(2026, 11, 29, 23, 15, 7, tzinfo=brasilia)
    assert new_backup_id(now, set()) == "20261130T021507Z"


def test_new_backup_id_suffix_on_collision() -> None:
    now = datetime(2026, 11, 30, 2, 15, 7, tzinfo=UTC)
    base = "20261130T021507Z"
    assert new_backup_id(now, {base}) == f"{base}-1"
    assert new_backup_id(now, {base, f"{base}-1", f"{base}-2"}) == f"{base}-3"
    assert new_backup_id(now, {f"{base}-1"}) == base  # the bare id is free
    assert ID_PATTERN.match(f"{base}-3")


def test_id_sort_key_order() -> None:
    ids = ["20260301T000000Z-10", "20260301T000000Z", "20260301T000000Z-9",
           "20260228T235959Z", "20260301T000000Z-1", "20260301T000001Z"]
    assert sorted(ids, key=id_sort_key) == [
        "20260228T235959Z", "20260301T000000Z", "20260301T000000Z-1",
        "20260301T000000Z-9", "20260301T000000Z-10", "20260301T000001Z"]
    assert id_sort_key("20260301T000000Z-10") > id_sort_key("20260301T000000Z-9")


def test_id_pattern() -> None:
    for good in ("20260301T021500Z", "20260301T021500Z-1", "20260301T021500Z-999"):
        assert ID_PATTERN.match(good)
    for bad in ("2026-03-01", "20260301T021500", "20260301T021500Z-", "x20260301T021500Z",
                "20260301T021500Z/x", "20260301t021500z"):
        assert not ID_PATTERN.match(bad)


def test_manifest_json_round_trip() -> None:
    manifest = make_manifest("20260301T021500Z-2")
    data = manifest.to_json()
    assert data.endswith(b"\n")
    back = Manifest.from_json(data, "where")
    assert back == manifest
    assert back.size_bytes == 3345
    assert back.artifact("uploads") is not None
    assert back.artifact("uploads").name == "uploads.tar.zst"  # type: ignore[union-attr]
    assert back.artifact("globals") is None
    assert back.format == FORMAT_VERSION
    assert back.database is not None and back.database.tables['public."Observações"'] == 7
    assert back.started_at.tzinfo is not None


def test_manifest_keeps_unknown_keys() -> None:
    import json
    raw = json.loads(make_manifest("20260301T021500Z").to_json())
    raw["added_by_a_newer_version"] = {"x": 1}
    back = Manifest.from_json(json.dumps(raw).encode(), "where")
    assert back.id == "20260301T021500Z"


@pytest.mark.parametrize(("data", "match"), [
    (b"", "invalid manifest"),
    (b"\xff\xfe not json", "invalid manifest"),
    (b"{not json", "invalid manifest"),
    (b"[1, 2, 3]", "unsupported manifest format"),
    (b'"a string"', "unsupported manifest format"),
    (b"{}", "unsupported manifest format"),
    (b'{"format": 2, "id": "20260301T021500Z"}', "unsupported manifest format"),
    (b'{"format": "1"}', "unsupported manifest format"),
    (b'{"format": 1, "id": "20260301T021500Z"}', "invalid manifest"),
])
def test_manifest_from_json_rejects(data: bytes, match: str) -> None:
    with pytest.raises(IntegrityError, match=match) as info:
        Manifest.from_json(data, "target 'nas': 20260301T021500Z/manifest.json")
    assert str(info.value).startswith("target 'nas': 20260301T021500Z/manifest.json: ")


def test_manifest_from_json_rejects_bad_fields() -> None:
    import json
    raw = json.loads(make_manifest("20260301T021500Z").to_json())
    raw["artifacts"][0]["sha256"] = "not-hex"
    with pytest.raises(IntegrityError, match="invalid manifest"):
        Manifest.from_json(json.dumps(raw).encode(), "m")
    raw = json.loads(make_manifest("20260301T021500Z").to_json())
    raw["id"] = "../../etc"
    with pytest.raises(IntegrityError, match="invalid manifest"):
        Manifest.from_json(json.dumps(raw).encode(), "m")


# =================================================================================================
# catalog
# =================================================================================================

def local(tmp_path: Path, name: str) -> LocalTarget:
    return LocalTarget(LocalTargetConfig(name=name, type="local", path=tmp_path / name))


def store(target: LocalTarget, key: str, data: bytes) -> None:
    upload = target.writer(key)
    upload.write(data)
    upload.commit()


def store_backup(target: LocalTarget, backup_id: str, kind: str = "scheduled",
                 manifest: bool = True) -> None:
    """A backup's files as the manifest lists them (sizes right: the listing is checked),
    then the manifest unless ``manifest`` is False (an incomplete copy)."""
    made = make_manifest(backup_id, kind)
    for artifact in made.artifacts:
        store(target, f"{backup_id}/{artifact.name}", b"\0" * artifact.size)
    if manifest:
        store(target, f"{backup_id}/{MANIFEST_NAME}", made.to_json())


@pytest.fixture
def two_targets(tmp_path: Path) -> tuple[LocalTarget, LocalTarget]:
    nas, usb = local(tmp_path, "nas"), local(tmp_path, "usb")
    store_backup(nas, "20260301T021500Z")
    store_backup(usb, "20260301T021500Z")
    store_backup(nas, "20260302T021500Z-9")
    store_backup(nas, "20260302T021500Z-10")                       # newest complete scheduled
    store_backup(usb, "20260302T021500Z-10", manifest=False)      # incomplete copy
    store_backup(nas, "20260303T090000Z", kind="safety")           # newer, but a safety backup
    store_backup(usb, "20260304T021500Z", manifest=False)          # newest, incomplete
    return nas, usb


def test_scan_groups_and_orders(two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    backups = scan(list(two_targets))
    assert [b.id for b in backups] == [
        "20260301T021500Z", "20260302T021500Z-9", "20260302T021500Z-10",
        "20260303T090000Z", "20260304T021500Z"]
    by_id = {b.id: b for b in backups}
    assert [c.target.name for c in by_id["20260301T021500Z"].copies] == ["nas", "usb"]
    b10 = by_id["20260302T021500Z-10"]
    assert [c.target.name for c in b10.complete_copies] == ["nas"]
    assert b10.status == "complete"
    assert by_id["20260304T021500Z"].status == "incomplete"
    assert by_id["20260304T021500Z"].manifest is None


def test_scan_without_manifests(two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    backups = scan(list(two_targets), with_manifests=False)
    assert len(backups) == 5
    assert all(b.status == "incomplete" for b in backups)


def test_resolve_latest_skips_safety_and_incomplete(
        two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    backups = scan(list(two_targets))
    latest = resolve(backups, "latest", use=Use.RESTORE)
    assert latest.id == "20260302T021500Z-10"
    assert latest.manifest is not None and latest.manifest.kind == "scheduled"


def test_resolve_by_id(two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    backups = scan(list(two_targets))
    assert resolve(backups, "20260301T021500Z", use=Use.RESTORE).id == "20260301T021500Z"
    # Explicit ids may name a safety backup.
    safety = resolve(backups, "20260303T090000Z", use=Use.RESTORE)
    assert safety.manifest is not None and safety.manifest.kind == "safety"


def test_resolve_incomplete_id(two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    with pytest.raises(UsageError, match="incomplete") as info:
        resolve(scan(list(two_targets)), "20260304T021500Z", use=Use.RESTORE)
    assert info.value.exit_code == ExitCode.USAGE


def test_resolve_unknown_id(two_targets: tuple[LocalTarget, LocalTarget]) -> None:
    with pytest.raises(UsageError, match="no backup with id '20990101T000000Z'"):
        resolve(scan(list(two_targets)), "20990101T000000Z", use=Use.RESTORE)


def test_resolve_latest_with_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no complete backup"):
        resolve([], "latest", use=Use.RESTORE)
    only_safety = Backup("20260303T090000Z", [
        Copy(local(tmp_path, "t"), [], make_manifest("20260303T090000Z", "safety"))])
    with pytest.raises(UsageError, match="no complete backup"):
        resolve([only_safety], "latest", use=Use.RESTORE)


def test_resolve_with_constructed_objects(tmp_path: Path) -> None:
    target = local(tmp_path, "t")
    backups = [
        Backup("20260301T000000Z-9", [Copy(target, [], make_manifest("20260301T000000Z-9"))]),
        Backup("20260301T000000Z-10", [Copy(target, [], make_manifest("20260301T000000Z-10"))]),
        Backup("20260301T000001Z", [Copy(target, [], None)]),
    ]
    assert resolve(backups, "latest", use=Use.RESTORE).id == "20260301T000000Z-10"


def test_damaged_manifest_makes_copy_incomplete(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    good, bad = local(tmp_path, "good"), local(tmp_path, "bad")
    store_backup(good, "20260301T021500Z")
    store(bad, "20260301T021500Z/database.dump.zst", b"dump")
    store(bad, f"20260301T021500Z/{MANIFEST_NAME}", b"{truncated")
    store_backup(bad, "20260302T021500Z")
    # A manifest copied into the wrong folder describes another backup: not usable either.
    store(bad, f"20260303T021500Z/{MANIFEST_NAME}", make_manifest("20260302T021500Z").to_json())
    with caplog.at_level(logging.WARNING):
        backups = {b.id: b for b in scan([good, bad])}
    first = backups["20260301T021500Z"]
    assert [c.target.name for c in first.complete_copies] == ["good"]
    bad_copy = next(c for c in first.copies if c.target.name == "bad")
    assert not bad_copy.complete
    assert bad_copy.problem is not None and "invalid manifest" in bad_copy.problem
    misplaced = backups["20260303T021500Z"]
    assert misplaced.status == "damaged"  # a manifest is there, but unusable
    assert "describes backup 20260302T021500Z" in (misplaced.copies[0].problem or "")
    assert resolve(list(backups.values()), "latest", use=Use.RESTORE).id == "20260302T021500Z"


def test_read_manifest(tmp_path: Path) -> None:
    target = local(tmp_path, "t")
    store_backup(target, "20260301T021500Z")
    assert read_manifest(target, "20260301T021500Z") == make_manifest("20260301T021500Z")
    with pytest.raises(ObjectNotFoundError):
        read_manifest(target, "20260302T021500Z")


# =================================================================================================
# locking
# =================================================================================================

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from conexa_backup.locking import run_lock
    with run_lock(Path(sys.argv[1]), "backup (test holder)"):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    from tests.test_failures import lock_held

    with lock_held(tmp_path, HOLDER) as proc:
        yield proc


def test_lock_held_by_another_process(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(LockedError) as info, run_lock(tmp_path, "restore"):
        pytest.fail("entered a lock another process holds")
    assert info.value.exit_code == ExitCode.LOCKED
    assert f"pid {holder.pid}" in str(info.value)
    assert "backup (test holder)" in str(info.value)


def test_lock_of_sigkilled_process_does_not_block(tmp_path: Path,
                                                  holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the lock died with the process
    with run_lock(tmp_path, "backup"):
        content = (tmp_path / LOCK_NAME).read_text()
        assert re.fullmatch(rf"pid {os.getpid()}, backup, since \S+Z\n", content)


def test_lock_released_after_block(tmp_path: Path) -> None:
    with run_lock(tmp_path, "first"):
        pass
    with run_lock(tmp_path, "second"):
        assert "second" in (tmp_path / LOCK_NAME).read_text()
    assert stat.S_IMODE((tmp_path / LOCK_NAME).stat().st_mode) == 0o600


def test_lock_released_when_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), run_lock(tmp_path, "first"):
        raise RuntimeError("boom")
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path;"
         "from conexa_backup.locking import run_lock\n"
         "with run_lock(Path(sys.argv[1]), 'probe'): print('ok')", str(tmp_path)],
        capture_output=True, text=True, check=False)
    assert probe.stdout.strip() == "ok", probe.stderr


# -- scratch left by killed runs ------------------------------------------------------------

@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _made_by(stem: str, pid: int) -> str:
    """A scratch name as process ``pid`` of this host, boot and pid namespace would make it."""
    return scratch_name(stem).replace(f".{os.getpid()}@", f".{pid}@")


def test_scratch_names_tell_abandoned_from_live(dead_pid: int) -> None:
    name = _made_by("dump-ab12cd", dead_pid)
    here = name.rpartition("@")[2]
    host, _, boot_ns = here.partition("+")
    assert abandoned(name)
    assert not abandoned(scratch_name("dump-ab12cd"))  # ours, running
    assert not abandoned(_made_by("dump-ab12cd", os.getppid()))  # alive
    # Made elsewhere, where that pid means another process: another host, another boot of
    # this one (or a cloned VM), another pid namespace (a container with our host name).
    assert not abandoned(f"dump-ab12cd.{dead_pid}@not-{host}+{boot_ns}")
    assert not abandoned(f"dump-ab12cd.{dead_pid}@{host}+00000000.{boot_ns.split('.')[1]}")
    assert not abandoned(f"dump-ab12cd.{dead_pid}@{host}+{boot_ns.split('.')[0]}.1")
    assert not abandoned(f"dump-ab12cd.{dead_pid}@{host}")  # an older, untagged form
    assert not abandoned("20261130T000000Z-ab12cd-database.dump")  # untagged


def test_sweep_stale_removes_scratch_of_runs_that_are_gone(tmp_path: Path, dead_pid: int) -> None:
    staging, drills = tmp_path / "staging", tmp_path / "drills"
    (staging / _made_by("dump-ab12cd", dead_pid)).mkdir(parents=True)
    (staging / _made_by("dump-ab12cd", dead_pid) / "toc.dat").write_bytes(b"x")
    (staging / _made_by("X-ab12cd-database.dump", dead_pid)).write_bytes(b"personal data")
    (drills / _made_by("X-local-ab12cd", dead_pid)).mkdir(parents=True)
    elsewhere = _made_by("other", dead_pid).replace("@", "@not-", 1)
    kept = [scratch_name("live"), elsewhere, "untagged"]
    for name in kept:
        (staging / name).write_bytes(b"in use")
    removed = sweep_stale(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in staging.iterdir()) == sorted(kept)
    assert list(drills.iterdir()) == []
    # A day later, whoever made them, they go too (no run of ours lasts a day).
    assert len(sweep_stale(tmp_path, now=time.time() + 2 * 86400)) == 3


def test_local_target_sweeps_temporaries_of_runs_that_are_gone(tmp_path: Path,
                                                               dead_pid: int) -> None:
    target = LocalTarget(LocalTargetConfig(name="local", type="local", path=tmp_path))
    folder = tmp_path / "20261130T000000Z"
    folder.mkdir()
    gone = folder / f".tmp-{_made_by('database.dump.zst', dead_pid)}"
    gone.write_bytes(b"half a dump")
    live = folder / f".tmp-{scratch_name('uploads.tar.zst')}"
    live.write_bytes(b"being written")
    assert target.sweep_temporaries() == 1
    assert not gone.exists() and live.exists()


def test_lock_in_missing_state_dir(tmp_path: Path) -> None:
    from conexa_backup.errors import ConexaError
    with pytest.raises(ConexaError, match="cannot open lock file"), \
            run_lock(tmp_path / "missing", "backup"):
        pass


# =================================================================================================
# process
# =================================================================================================

def test_run_returns_stdout() -> None:
    assert process.run(["sh", "-c", "printf 'héllo'"]) == "héllo"


def test_run_failure_carries_stderr_tail() -> None:
    with pytest.raises(ProcessError) as info:
        process.run(["sh", "-c", "echo starting; echo boom >&2; exit 3"], what="pg_dump")
    err = info.value
    assert err.returncode == 3
    assert err.stderr_tail == "boom"
    assert str(err) == "pg_dump failed (exit 3): boom"


def test_run_stderr_tail_is_bounded() -> None:
    script = "for i in $(seq 1 100); do echo line$i >&2; done; exit 1"
    with pytest.raises(ProcessError) as info:
        process.run(["sh", "-c", script])
    lines = info.value.stderr_tail.splitlines()
    assert len(lines) == process.STDERR_TAIL_LINES
    assert lines[-1] == "line100"
    assert "line1\n" not in info.value.stderr_tail + "\n"
    assert str(info.value).startswith("sh failed (exit 1): ")


def test_run_missing_program() -> None:
    with pytest.raises(ProcessError, match="no-such-program-xyz not found") as info:
        process.run(["/nonexistent/bin/no-such-program-xyz", "--version"])
    assert info.value.returncode is None
    assert info.value.stderr_tail == ""


def test_run_secret_in_env_not_in_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="conexa_backup.process"):
        out = process.run(["sh", "-c", 'printf %s "$PGPASSWORD"'], env={"PGPASSWORD": SECRET})
    assert out == SECRET
    assert "running sh -c" in caplog.text
    assert SECRET not in caplog.text


def test_run_to_file(tmp_path: Path) -> None:
    out = tmp_path / "globals.sql"
    assert process.run(["sh", "-c", "echo 'CREATE ROLE x;'"], stdout_path=str(out)) == ""
    assert out.read_text() == "CREATE ROLE x;\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_run_does_not_use_a_shell() -> None:
    assert process.run(["echo", "$HOME; rm -rf /tmp/x"]) == "$HOME; rm -rf /tmp/x\n"


def test_stream_reads_stdout_and_checks_exit() -> None:
    with process.stream(["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"]) as child:
        data = child.stdout.read()
        child.wait_ok()
    assert data == b"\0" * 300_000


def test_stream_failure_carries_stderr_tail() -> None:
    script = "echo partial; echo 'pg_dump: error: nope' >&2; exit 1"
    with pytest.raises(ProcessError) as info, \
            process.stream(["sh", "-c", script], what="pg_dump") as child:
        assert child.stdout.read() == b"partial\n"
        child.wait_ok()
    assert info.value.returncode == 1
    assert "pg_dump: error: nope" in str(info.value)


def test_stream_kills_child_when_block_raises() -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="upload failed"), \
            process.stream(["sleep", "60"]) as child:
        proc = child.proc
        assert proc.poll() is None
        raise RuntimeError("upload failed")
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_stream_kills_chatty_child_when_block_raises() -> None:
    """A child blocked writing to a full pipe is killed too (nobody reads it any more)."""
    with pytest.raises(KeyError), process.stream(["sh", "-c", "exec cat /dev/zero"]) as child:
        proc = child.proc
        child.stdout.read(10)
        raise KeyError("bad")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout is not None and proc.stdout.closed


def test_watch_reports_matching_lines_as_they_come(tmp_path: Path) -> None:
    """Each match arrives while the child still runs (here it waits for our answer)."""
    answer = tmp_path / "answer"
    os.mkfifo(answer)
    script = (f"echo 'pg_dump: finished item 12 TABLE DATA a' >&2; read x < {answer}; "
              "echo 'noise' >&2; echo 'pg_dump: finished item 7 TABLE DATA b' >&2")
    seen = []
    with process.watch(["sh", "-c", script], re.compile(r"finished item (\d+) ")) as child:
        for found in child.matches():
            seen.append(found[1])
            if found[1] == "12":
                assert child.proc.poll() is None  # reported before the child went on
                answer.write_text("go\n")
        child.wait_ok()
    assert seen == ["12", "7"]


def test_watch_failure_carries_stderr_tail() -> None:
    script = "echo 'finished item 1 x' >&2; echo 'pg_dump: error: disk full' >&2; exit 1"
    with pytest.raises(ProcessError, match="disk full"), \
            process.watch(["sh", "-c", script], re.compile(r"finished item (\d+) ")) as child:
        assert [m[1] for m in child.matches()] == ["1"]
        child.wait_ok()


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may not reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_stream_kills_the_childs_workers_too(tmp_path: Path) -> None:
    """Like pg_dump -j's workers, a grandchild still busy when the block fails is killed."""
    pidfile = tmp_path / "worker"
    script = f"sleep 60 & echo $! > '{pidfile}'; wait"
    with pytest.raises(RuntimeError, match="upload failed"), \
            process.stream(["sh", "-c", script]):
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        raise RuntimeError("upload failed")
    worker = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _gone(worker):
        assert time.monotonic() < deadline, "the worker outlived the failure"
        time.sleep(0.05)


def test_stream_missing_program() -> None:
    with pytest.raises(ProcessError, match="pg_dump not found"), \
            process.stream(["/nonexistent/pg_dump"]):
        pytest.fail("started a missing program")


def test_child_env_merges() -> None:
    env = process.child_env({"PGHOST": "db"})
    assert env["PGHOST"] == "db"
    assert env["PATH"] == os.environ["PATH"]


def test_format_argv_quotes() -> None:
    assert process.format_argv(["pg_restore", "--dbname=a b", "x'y"]) == \
        "pg_restore '--dbname=a b' 'x'\"'\"'y'"
