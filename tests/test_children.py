"""Children die with the tool (issue 20), even when the tool is killed outright.

Each child leads its own process group, so a SIGKILL of the tool's group used to leave
``pg_restore`` (and its ``-j`` workers) loading a throwaway database with parent PID 1, and a
``pg_dump`` waiting for a lock. Here the tool's whole process group is SIGKILLed while the
child is busy (the moment is a state seen from outside: the child's query in
``pg_stat_activity``, never a sleep), and no process of the run may be alive 2 s later.
The child is made to stay busy for a known time by the database itself: a CHECK constraint
that sleeps for each row it checks (pg_restore), an ACCESS EXCLUSIVE lock (pg_dump).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conexa_backup import deathsig, process
from tests.conftest import Workspace
from tests.test_failures import assert_ok, cli_argv, processes_with_env, wait_for

GONE_WITHIN = 2.0  # seconds from the kill until no process of the run is left (issue 20)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    return process.start_time(pid) is not None


@contextlib.contextmanager
def _own_group(argv: list[str], marker: str) -> Iterator[subprocess.Popen[str]]:
    """Start ``argv`` leading a process group of its own (the "tool's group" a kill takes
    down), ``CONEXA_MARK=marker`` in its environment (its children inherit it). On the way
    out whatever carries the marker is SIGKILLed, so a failing test leaves nothing behind."""
    proc = subprocess.Popen(argv, env={**os.environ, "CONEXA_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, process_group=0)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        for pid in processes_with_env(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_group_and_check(proc: subprocess.Popen[str], marker: str, what: str) -> None:
    """SIGKILL ``proc``'s whole group (the tool; never its children's groups), reap it, and
    require every process carrying ``marker`` to be gone within :data:`GONE_WITHIN`."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    wait_for(lambda: not processes_with_env(marker), GONE_WITHIN,
             f"{what}: no child of the killed run left, found "
             f"{[_describe(p) for p in processes_with_env(marker)]}")


def _describe(pid: int) -> str:
    with contextlib.suppress(OSError):
        return f"{pid} " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")\
            .decode(errors="replace")[:120]
    return str(pid)


# -- the mechanism, without a database --------------------------------------------------------

# A program that starts ``sleep`` through process.stream (from the main thread, or from a
# worker thread) and prints its pid, then waits to be killed.
HOLDER = textwrap.dedent("""
    import sys, threading, time
    from conexa_backup import process

    def hold():
        with process.stream(["sleep", "60"]) as child:
            print(child.proc.pid, flush=True)
            child.wait_ok()

    if sys.argv[1] == "thread":
        threading.Thread(target=hold, daemon=True).start()
        time.sleep(120)
    else:
        hold()
""")


@pytest.mark.parametrize("where", ["main", "thread"])
def test_a_child_dies_when_the_tool_is_killed_outright(where: str) -> None:
    marker = f"conexa-children-{uuid.uuid4().hex}"
    with _own_group([sys.executable, "-c", HOLDER, where], marker) as proc:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        assert _alive(child)
        _kill_group_and_check(proc, marker, f"sleep started from the {where} thread")


def test_a_child_started_from_a_thread_that_ends_runs_to_its_end() -> None:
    """The death signal follows the *thread* that started the child: a worker thread (here
    several, ending one after the other) that runs a child to completion must get its whole
    output, never a child killed when some thread ended."""
    results: list[str] = []

    def work(i: int) -> None:
        results.append(process.run(["sh", "-c", f"sleep 0.2; echo done {i}"]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [f"done {i}\n" for i in range(3)]
    # And one started after those threads ended.
    assert process.run(["sh", "-c", "sleep 0.2; echo after"]) == "after\n"


@pytest.mark.skipif(not deathsig.supported(), reason="Linux only")
def test_a_child_whose_parent_is_already_gone_never_runs_the_program(tmp_path: Path) -> None:
    """The tool died between the fork and prctl: the child must not run unwatched. Seen by
    the helper as a parent pid other than the one it was given."""
    ran = tmp_path / "ran"
    touch = subprocess.run(["which", "touch"], capture_output=True, text=True, check=True)
    program = touch.stdout.strip()
    not_our_parent = 1
    done = subprocess.run(deathsig.wrap(program, ["touch", str(ran)], parent=not_our_parent),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == -deathsig.DEATH_SIGNAL, done.stderr
    assert not ran.exists()
    # The same with the right parent runs it.
    done = subprocess.run(deathsig.wrap(program, ["touch", str(ran)]), capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert ran.exists()


def test_a_child_starts_with_sigpipe_at_its_default() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a child must not inherit that (pg_dump writing
    into a pipe nobody reads any more must die of it)."""
    status = process.run(["cat", "/proc/self/status"])
    ignored = int(next(line.split()[1] for line in status.splitlines()
                       if line.startswith("SigIgn:")), 16)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not ignored & (1 << (sig - 1)), f"{sig.name} ignored in the child"


def test_a_missing_program_is_still_named() -> None:
    with pytest.raises(process.ProcessError, match="no-such-program-xyz not found on PATH"):
        process.run(["no-such-program-xyz", "--version"])


# -- a real run killed while pg_restore / pg_dump works ---------------------------------------

ROWS = 400
SLEEP_PER_ROW = 0.05  # restoring the table takes ROWS * this = 20 s: far longer than the test


def _slow_to_restore(ws: Workspace) -> None:
    """Add a table whose rows each take SLEEP_PER_ROW to check when restored (the CHECK's
    function sleeps only once the rows are in: the constraint is not checked again here)."""
    with ws.cluster.connect(ws.dbname) as conn:
        conn.execute("CREATE FUNCTION slow_ok(n int) RETURNS boolean LANGUAGE sql IMMUTABLE "
                     "AS 'SELECT true'")
        conn.execute("CREATE TABLE slow_rows (n int CHECK (slow_ok(n)))")
        conn.execute(f"INSERT INTO slow_rows SELECT generate_series(1, {ROWS})")
        conn.execute("CREATE OR REPLACE FUNCTION slow_ok(n int) RETURNS boolean LANGUAGE sql "
                     f"IMMUTABLE AS 'SELECT true FROM pg_sleep({SLEEP_PER_ROW})'")


def _busy(ws: Workspace, program: str, query_start: str, database_prefix: str) -> bool:
    """A session of ``program`` in a database named ``database_prefix…`` runs a query
    starting with ``query_start``."""
    with ws.cluster.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND starts_with(datname, %s) AND starts_with(query, %s) AND state = 'active'",
            (program, database_prefix, query_start)).fetchone()
    return bool(row and row[0])


def test_a_restore_killed_during_pg_restore_leaves_no_process(ws: Workspace) -> None:
    """pg_restore -j 2: the kill comes while a worker copies the slow table, so the workers
    (forked by pg_restore, unknown to us) must go too."""
    _slow_to_restore(ws)
    assert_ok(ws.run("backup"))
    marker = f"conexa-children-{uuid.uuid4().hex}"
    copy = f"{ws.dbname}_copy"
    argv = cli_argv(ws, "restore", "latest", "--yes", "--to-database", copy)
    with _own_group(argv, marker) as proc:
        wait_for(lambda: _busy(ws, "pg_restore", "COPY public.slow_rows", copy)
                 or proc.poll() is not None, 60, "pg_restore to copy the slow table")
        assert proc.poll() is None, proc.communicate()
        _kill_group_and_check(proc, marker, "restore killed in pg_restore")


def test_a_backup_killed_during_pg_dump_leaves_no_process(ws: Workspace) -> None:
    """pg_dump waits for a table lock the test holds (it would wait lock_wait_timeout, 10
    minutes); the kill comes while it waits."""
    with ws.cluster.connect(ws.dbname) as conn:
        conn.execute("CREATE TABLE held_rows (n int)")
    marker = f"conexa-children-{uuid.uuid4().hex}"
    with psycopg.connect(ws.cluster.url(ws.dbname)) as holder:
        holder.execute("LOCK TABLE held_rows IN ACCESS EXCLUSIVE MODE")  # until rollback
        with _own_group(cli_argv(ws, "backup"), marker) as proc:
            wait_for(lambda: _busy(ws, "pg_dump", "LOCK TABLE", ws.dbname)
                     or proc.poll() is not None, 60, "pg_dump to wait for the lock")
            assert proc.poll() is None, proc.communicate()
            _kill_group_and_check(proc, marker, "backup killed in pg_dump")
        holder.rollback()
