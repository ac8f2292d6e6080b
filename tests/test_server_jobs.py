"""Jobs of the API server (server/jobs.py) as plain Python: the CLI run as a child against
the real PostgreSQL cluster, the real flock, real signals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conexa_backup import locking, process
from conexa_backup.errors import BusyError, JobNotFoundError, UsageError
from conexa_backup.server.job import Job
from conexa_backup.server.jobs import JobStore, command
from conexa_backup.testing.compare import table_row_counts
from tests.conftest import Workspace
from tests.test_failures import (
    _q,
    complete_ids,
    configure,
    listed,
    lock_held,
    make_bin_dir,
    temp_files,
    wait_for,
)

ADMIN = "maria@escola"


def wait_done(store: JobStore, job_id: str, timeout: float = 120) -> Job:
    wait_for(lambda: not store.get(job_id).active, timeout, f"job {job_id} to end")
    return store.get(job_id)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def holder(ws: Workspace) -> Iterator[subprocess.Popen[str]]:
    """A process holding the run lock, as a CLI run would."""
    with lock_held(ws.state) as proc:
        yield proc


def test_backup_job_succeeds_and_is_listed(ws: Workspace) -> None:
    store = JobStore(ws.state, ws.config)
    job = store.start("backup", {}, ADMIN)
    assert job.state == "running" and job.pid and job.started and job.sub == ADMIN
    done = wait_done(store, job.id)
    assert (done.state, done.exit_code, done.error) == ("succeeded", 0, None), done
    assert done.backup_id and complete_ids(ws) == [done.backup_id]
    assert done.result is not None and done.result["status"] == "complete"
    assert done.steps, "the child's log lines show as progress"
    assert done.finished and done.started and done.created <= done.started <= done.finished
    record = ws.state / "jobs" / f"{job.id}.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE((ws.state / "jobs").stat().st_mode) == 0o700
    assert json.loads(record.read_text())["backup_id"] == done.backup_id
    assert [j.id for j in JobStore(ws.state, ws.config).list()] == [job.id]  # persisted


def test_restore_job_to_new_database(ws: Workspace) -> None:
    backup = ws.run("backup", "--json")
    assert backup.returncode == 0, backup.stderr
    backup_id = json.loads(backup.stdout)["id"]
    copy_db = f"{ws.dbname}_restored"
    store = JobStore(ws.state, ws.config)
    job = store.start("restore", {"backup_id": backup_id, "to_database": copy_db}, ADMIN)
    done = wait_done(store, job.id)
    assert done.state == "succeeded", done
    assert done.backup_id == backup_id and done.result is not None
    counts = table_row_counts(ws.cluster.url(ws.dbname))
    assert counts and counts == table_row_counts(ws.cluster.url(copy_db))


@pytest.mark.parametrize("args", [
    {"backup_id": "--no-safety-backup"}, {"backup_id": "../x"}, {},
    {"backup_id": "20250101T000000Z", "only": "everything"},
    {"backup_id": "20250101T000000Z", "uploads_to": "/tmp/x"},
])
def test_restore_arguments_checked(args: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        command("restore", args)


def test_restore_command_always_confirmed_with_safety_backup() -> None:
    argv = command("restore", {"backup_id": "20250101T000000Z", "to_database": "-x",
                               "only": "database"})
    assert argv[-2:] == ["--", "20250101T000000Z"]
    assert "--yes" in argv and "--to-database=-x" in argv
    assert "--no-safety-backup" not in argv


def test_start_while_cli_holds_lock_is_busy(ws: Workspace,
                                            holder: subprocess.Popen[str]) -> None:
    store = JobStore(ws.state, ws.config)
    with pytest.raises(BusyError) as info:
        store.start("backup", {}, ADMIN)
    assert info.value.holder == f"pid {holder.pid}, test holder"
    assert info.value.since and info.value.since.endswith("Z")
    assert store.list() == []


def test_child_that_loses_the_lock_race_fails_locked(
        ws: Workspace, holder: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # The probe saw the lock free, then another run took it before the child did.
    monkeypatch.setattr(locking, "holder", lambda state_dir: None)
    store = JobStore(ws.state, ws.config)
    done = wait_done(store, store.start("backup", {}, ADMIN).id)
    assert (done.state, done.exit_code) == ("failed", 4)
    assert done.error and done.error.startswith("locked:") and f"pid {holder.pid}" in done.error


def test_two_starts_at_once_one_busy(ws: Workspace) -> None:
    store = JobStore(ws.state, ws.config)
    barrier = threading.Barrier(2)
    started: list[Job] = []
    refused: list[BusyError] = []

    def start() -> None:
        barrier.wait()
        try:
            started.append(store.start("backup", {}, ADMIN))
        except BusyError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1 and len(refused) == 1
    assert refused[0].holder == f"job {started[0].id} (backup)"
    assert wait_done(store, started[0].id).state == "succeeded"
    assert len(store.list()) == 1


def test_cancel_running_backup(ws: Workspace, tmp_path: Path) -> None:
    streaming = tmp_path / "pg_dump streaming"
    body = f'"$REAL" "$@" | {{ head -c 20000; touch {_q(streaming)}; sleep 60; cat; }}'
    configure(ws, bin_dir=make_bin_dir(tmp_path / "slow bin", body))
    store = JobStore(ws.state, ws.config)
    job = store.start("backup", {}, ADMIN)
    wait_for(streaming.exists, 60, "pg_dump to stream its first bytes")
    assert store.cancel(job.id).cancel_requested
    done = wait_done(store, job.id)
    assert (done.state, done.exit_code) == ("canceled", 143), done
    assert done.pid is not None
    wait_for(lambda: group_gone(done.pid or 0), 30, "the job's process group to end")
    assert [e for e in listed(ws) if e["status"] == "complete"] == []
    assert temp_files(ws.backups) == []
    assert store.cancel(job.id).state == "canceled"  # over: a no-op


def _write_running(ws: Workspace, job_id: str, pid: int, pid_start: int | None) -> None:
    folder = ws.state / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    job = Job(job_id, "backup", {}, ADMIN, state="running", started="2026-01-01T00:00:00Z",
              pid=pid, pid_start=pid_start)
    (folder / f"{job_id}.json").write_text(json.dumps(job.to_json()))


def test_recover_after_server_died(ws: Workspace) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_running(ws, "deadpid000000000", dead.pid, 12345)
    # The pid is alive but is another process (reused): its start time differs.
    _write_running(ws, "reusedpid0000000", os.getpid(), -1)
    store = JobStore(ws.state, ws.config)
    failed = store.recover()
    assert sorted(j.id for j in failed) == ["deadpid000000000", "reusedpid0000000"]
    for job_id in ("deadpid000000000", "reusedpid0000000"):
        job = store.get(job_id)
        assert (job.state, job.error) == ("failed", "server restarted")
        assert job.finished is not None
    # Nothing is running any more: a new job may start.
    assert wait_done(store, store.start("backup", {}, ADMIN).id).state == "succeeded"


def test_recover_follows_a_job_that_outlived_the_server(ws: Workspace) -> None:
    # Leads its own process group, as a job's child does.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                              process_group=0)
    try:
        start = process.start_time(orphan.pid)
        _write_running(ws, "orphan0000000000", orphan.pid, start)
        store = JobStore(ws.state, ws.config)
        assert store.recover() == []
        assert store.get("orphan0000000000").state == "running"
        with pytest.raises(BusyError):
            store.start("backup", {}, ADMIN)
        store.cancel("orphan0000000000")
        orphan.wait(timeout=30)  # our test's child, so it becomes a zombie until here
        done = wait_done(store, "orphan0000000000", 30)
    finally:
        orphan.kill()
        orphan.wait()
    # Canceled as asked; its exit code is unknown (not our child), and it wrote no answer.
    assert done.state == "canceled" and done.error and done.error.startswith("server restarted")


@pytest.mark.parametrize("job_id", ["../../etc/passwd", "%2e%2e", "a\0b", "x" * 500, ""])
def test_unknown_or_hostile_ids(ws: Workspace, job_id: str) -> None:
    store = JobStore(ws.state, ws.config)
    with pytest.raises(JobNotFoundError):
        store.get(job_id)
    with pytest.raises(JobNotFoundError):
        store.cancel(job_id)



def test_lock_holder_probe(tmp_path: Path) -> None:
    assert locking.holder(tmp_path) is None
    with locking.run_lock(tmp_path, "backup"):  # the probe let go of the lock at once
        found = locking.holder(tmp_path)
        assert found is not None and (found.pid, found.what) == (os.getpid(), "backup")
        assert found.since and found.since.endswith("Z")
    with locking.run_lock(tmp_path, "backup"):  # a line written by an older version
        (tmp_path / locking.LOCK_NAME).write_text("pid 42, restore\n")
        assert locking.holder(tmp_path) == locking.Holder(42, "restore", None)
