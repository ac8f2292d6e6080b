"""SIGTERM and SIGINT at many points of a real backup: exit 143/130 soon, leave nothing behind.

A backup of a database large enough that the dump lasts about a second is stopped at named
points, each reached by watching the run from outside (its log lines, its pg_dump child, the
bytes arriving on the targets), never by guessing with sleeps: during start-up, when the run
has started, at the snapshot export, as pg_dump starts, when the first bytes are stored,
mid-dump, in the uploads, and the same in a parallel directory dump. Each time the process
must exit with 128 + the signal's number within a bound, say so on one line, and leave no
partial copy, no pg_dump, no database session, no staging file; the database is untouched.

The regressions this guards: a signal taken inside ``threading``'s lock handling (a queue
then lost a wake-up and the run hung, joining its hash thread, for minutes), one lost in
code that cannot raise (the backup then ran to its end), and exit 1 instead of 130/143.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from conexa_backup import postgres
from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.sample import load_conexa, make_uploads_tree
from tests.test_failures import processes_with_env, temp_files, wait_for

SCALE = 1.5  # ~1 s of pg_dump on this kind of machine; loading it takes a few seconds
EXIT_WITHIN = 20.0  # seconds from the signal to the exit (healthy: well under one)
TARGETS = ("one", "two")  # two local targets: two upload threads behind the fan-out


@dataclass
class Bench:
    cluster: Cluster
    dbname: str
    root: Path
    state: Path
    reference: dict[str, int]  # database artifact size of the reference backup, by config

    def config(self, jobs: int) -> Path:
        path = self.root / f"backup-j{jobs}.toml"
        (self.root / "targets").mkdir(exist_ok=True)  # a local target makes only its own folder
        targets = "".join(f'[[targets]]\nname = "{n}"\ntype = "local"\npath = "{self.target(n)}"\n'
                          for n in TARGETS)
        path.write_text(
            f'state_dir = "{self.state}"\n'
            f'[database]\nurl = "{self.cluster.url(self.dbname)}"\ndump_jobs = {jobs}\n'
            # tar: a packs run leaves its complete packs on purpose (the next run reuses them)
            f'[uploads]\npath = "{self.root / "uploads"}"\nformat = "tar"\n' + targets,
            encoding="utf-8")
        return path

    def target(self, name: str) -> Path:
        return self.root / "targets" / name

    def argv(self, jobs: int, *args: str) -> list[str]:
        return [sys.executable, "-m", "conexa_backup", "--config", str(self.config(jobs)), *args]

    def entries(self) -> set[str]:
        """Everything on the targets, hidden files included."""
        return {p.relative_to(self.root).as_posix()
                for n in TARGETS for p in self.target(n).rglob("*")}

    def log_lines(self, pid: int) -> list[str]:
        """The log lines written by process ``pid``."""
        logs = self.state / "logs"
        text = "".join(p.read_text(encoding="utf-8") for p in logs.glob("*.log")) \
            if logs.is_dir() else ""
        return [line for line in text.splitlines() if f"[{pid}]" in line]

    def sessions(self) -> int:
        with self.cluster.connect() as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                               (self.dbname,)).fetchone()
        assert row is not None
        return int(row[0])

    def fingerprint(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        with psycopg.connect(self.cluster.url(self.dbname), autocommit=True) as conn:
            return postgres.row_counts(conn), postgres.schema_objects(conn)


@pytest.fixture(scope="module")
def bench(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("signals")
    dbname = f"signals_{os.getpid()}"
    cluster.create_database(dbname)
    load_conexa(cluster.url(dbname), scale=SCALE)
    # Large incompressible files: the uploads stage lasts long enough to be a point too.
    make_uploads_tree(root / "uploads", files=40, seed=3, incompressible_kib=2048)
    b = Bench(cluster, dbname, root, root / "state", {})
    try:
        for jobs in (1, 2):  # reference backups: sizes for "mid-dump", and copies to keep
            done = subprocess.run(b.argv(jobs, "backup", "--no-prune"), capture_output=True,
                                  text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
            assert done.returncode == 0, done.stderr
            folder = b.target("one") / done.stdout.strip()
            b.reference[str(jobs)] = sum(p.stat().st_size for p in folder.glob("database.*"))
        yield b
    finally:
        cluster.drop_database(dbname)


# -- points of a run, seen from outside ---------------------------------------------------

Probe = Callable[[Bench, subprocess.Popen[str], str], bool]


def _after(seconds: float) -> Probe:
    start = time.monotonic()

    def probe(b: Bench, proc: subprocess.Popen[str], marker: str) -> bool:
        nonlocal start
        return time.monotonic() - start >= seconds
    return probe


def _logged(pattern: str) -> Probe:
    def probe(b: Bench, proc: subprocess.Popen[str], marker: str) -> bool:
        return any(re.search(pattern, line) for line in b.log_lines(proc.pid))
    return probe


def _running(program: str) -> Probe:
    def probe(b: Bench, proc: subprocess.Popen[str], marker: str) -> bool:
        for pid in processes_with_env(marker):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == program:
                    return True
        return False
    return probe


def _stored(prefix: str, share: float) -> Probe:
    """A temporary file named ``prefix…`` on target "two" holds ``share`` of the database
    artifact's reference size (0: exists and is not empty)."""
    def probe(b: Bench, proc: subprocess.Popen[str], marker: str) -> bool:
        jobs = "2" if "dir" in prefix else "1"
        sizes = [p.stat().st_size for p in temp_files(b.target("two"))
                 if p.name.startswith(f".tmp-{prefix}")]
        return any(size > share * b.reference[jobs] for size in sizes)
    return probe


def _staged(b: Bench, proc: subprocess.Popen[str], marker: str) -> bool:
    """The parallel dump finished a table's file (or began one) in staging."""
    staging = b.state / "staging"
    return staging.is_dir() and any(staging.rglob("*.dat"))


@dataclass
class Point:
    name: str
    sig: signal.Signals
    jobs: int
    probe: Callable[[], Probe]
    # Before the interpreter runs any of our code, the default action kills it: a shell
    # reports 143/130 for that too, and nothing had started that could be left behind.
    may_die: bool = False


POINTS = [
    Point("start-up", signal.SIGTERM, 1, lambda: _after(0), may_die=True),
    Point("importing", signal.SIGINT, 1, lambda: _after(0.25)),
    Point("run started", signal.SIGTERM, 1, lambda: _logged(r"backup \S+ started")),
    Point("snapshot export", signal.SIGINT, 1, lambda: _logged(r"running \S*pg_dump --version")),
    Point("pg_dump starting", signal.SIGTERM, 1, lambda: _logged(r"running \S*pg_dump --format")),
    Point("pg_dump running", signal.SIGINT, 1, lambda: _running("pg_dump")),
    Point("first bytes stored", signal.SIGTERM, 1, lambda: _stored("database", 0)),
    Point("mid-dump", signal.SIGINT, 1, lambda: _stored("database", 0.4)),
    Point("uploads", signal.SIGTERM, 1, lambda: _stored("uploads.tar", 0)),
    Point("parallel dump staging", signal.SIGINT, 2, lambda: lambda b, p, m: _staged(b, p, m)),
    Point("parallel dump mid-archive", signal.SIGTERM, 2, lambda: _stored("database.dir", 0.4)),
]


def _stop_at(b: Bench, point: Point) -> None:
    before = b.entries()
    fingerprint = b.fingerprint()
    marker = f"conexa-signal-{uuid.uuid4().hex}"
    probe = point.probe()
    proc = subprocess.Popen(b.argv(point.jobs, "backup", "--no-prune"),
                            env={**os.environ, "CONEXA_MARK": marker}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not probe(b, proc, marker):
            assert proc.poll() is None, f"{point.name}: the run ended before the point"
            assert time.monotonic() < deadline, f"{point.name}: never reached"
            time.sleep(0.005)
        proc.send_signal(point.sig)
        sent = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{point.name}: still running {EXIT_WITHIN} s after {point.sig.name}")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    detail = f"{point.name}: exit {proc.returncode} after {took:.2f} s\n{stderr}"
    if not (point.may_die and proc.returncode == -point.sig):
        assert proc.returncode == 128 + point.sig, detail
        assert stderr.strip() == \
            f"error: interrupted by {point.sig.name}; partial work was removed", detail
    assert b.entries() == before, f"{point.name}: something of the run was left on a target"
    wait_for(lambda: not processes_with_env(marker), 5, f"{point.name}: no child left")
    wait_for(lambda: b.sessions() == 0, 5, f"{point.name}: the run's sessions to end")
    staging = b.state / "staging"
    assert not staging.is_dir() or not any(staging.iterdir()), f"{point.name}: staging left"
    assert b.fingerprint() == fingerprint


def test_a_signal_at_any_point_of_a_backup_exits_soon_and_leaves_nothing(bench: Bench) -> None:
    reference = bench.entries()
    for point in POINTS:
        _stop_at(bench, point)
    listed = subprocess.run(bench.argv(1, "list", "--json"), capture_output=True, text=True,
                            timeout=60, check=True, stdin=subprocess.DEVNULL)
    assert listed.stdout.count('"complete"') == 2, listed.stdout  # the two references only
    assert bench.entries() == reference


# -- the mechanism, one process each --------------------------------------------------------

def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)


def test_a_signal_raised_where_python_cannot_propagate_it_is_raised_again() -> None:
    """A signal taken inside a ``__del__`` is "ignored" by Python: it must come back."""
    result = _python(
        "import os, signal, time\n"
        "from conexa_backup import signals\n"
        "signals.install()\n"
        "class Ouch:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "try:\n"
        "    Ouch()\n"
        "    deadline = time.monotonic() + 10\n"
        "    while time.monotonic() < deadline:\n"
        "        time.sleep(0.01)\n"
        "    print('went on')\n"
        "except KeyboardInterrupt as exc:\n"
        "    print('stopped by', exc.args[0])\n")
    assert result.stdout.strip() == "stopped by SIGTERM", result.stderr


# The hang, step by step: a thread-directed SIGTERM lands while the main thread, woken from a
# full queue's Condition.wait, waits to take the queue's lock back; the consumer holds it.
QUEUE_LOCK_RACE = """
import os, signal, sys, threading, time
from pathlib import Path
from conexa_backup import signals
from conexa_backup.pipeline import ThreadedSink

signals.install()
release = threading.Event()


class Stuck:
    def write(self, data):
        release.wait()


def until(predicate):
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


main = threading.main_thread()
sink = ThreadedSink(Stuck(), "stuck", 1)
sink.write(b"taken")  # its thread takes it and stays in Stuck.write
until(lambda: sink._queue.qsize() == 0)
sink.write(b"queued")  # the queue (depth 1) is full now
report = {}


def where():
    frame = sys._current_frames().get(main.ident)
    return frame.f_code.co_name if frame else ""


def blocked():
    return Path(f"/proc/self/task/{main.native_id}/stat").read_text().split(") ")[1][0] == "S"


def meddle():
    q = sink._queue
    until(lambda: where() == "wait" and blocked())  # the main thread waits for room
    with q.mutex:
        q.queue.popleft()  # what a get() does, under the queue's lock
        q.not_full.notify()
        until(lambda: where() == "_acquire_restore" and blocked())  # it wants the lock back
        signal.pthread_kill(main.ident, signal.SIGTERM)
        until(lambda: where() != "_acquire_restore" or signals._pending)
        report["lock still ours"] = q.mutex.locked()
    release.set()


helper = threading.Thread(target=meddle)
helper.start()
try:
    sink.write(b"third")
    report["write"] = "returned"
except KeyboardInterrupt as exc:
    report["write"] = f"interrupted by {exc.args[0]}"
helper.join()
done = threading.Thread(target=sink.abandon, daemon=True)
done.start()
done.join(5)
report["abandon"] = "hangs" if done.is_alive() else "returned"
print(report, flush=True)
os._exit(0)
"""


def test_a_signal_while_a_queue_put_retakes_its_lock_leaves_the_queue_working() -> None:
    """Before: the interrupted put released the lock the other thread held, the queue lost a
    wake-up and ``abandon`` (joining the thread) hung forever. Each step waits on a state of
    the main thread (its Python frame, and "sleeping" in /proc), so this is deterministic."""
    result = _python(QUEUE_LOCK_RACE)
    assert result.stdout.strip() == ("{'lock still ours': True, 'write': 'interrupted by "
                                     "SIGTERM', 'abandon': 'returned'}"), result.stderr


def test_a_signal_inside_held_is_raised_as_the_block_ends() -> None:
    result = _python(
        "import os, signal\n"
        "from conexa_backup import signals\n"
        "signals.install()\n"
        "steps = []\n"
        "try:\n"
        "    with signals.held():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        steps.append('rest of the block')\n"
        "    steps.append('after')\n"
        "except KeyboardInterrupt as exc:\n"
        "    steps.append(exc.args[0])\n"
        "print(steps)\n")
    assert result.stdout.strip() == "['rest of the block', 'SIGINT']", result.stderr


def test_a_signal_raised_at_once_supersedes_one_still_held() -> None:
    """The window where held() has left its block but not yet raised what it held: a second
    signal there is raised at once, and the first must not stay behind to be raised again
    by the next held() block (in the middle of the cleanup the second one started)."""
    result = _python(
        "import os, signal\n"
        "from conexa_backup import signals\n"
        "signals.install()\n"
        "steps = []\n"
        "signals._pending = signal.SIGTERM  # held, the block's end not yet reached\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # outside any block: raised now\n"
        "except KeyboardInterrupt as exc:\n"
        "    steps.append(exc.args[0])\n"
        "try:\n"
        "    with signals.held():  # the cleanup's next held() block\n"
        "        pass\n"
        "    steps.append('cleanup went on')\n"
        "except KeyboardInterrupt as exc:\n"
        "    steps.append('stale ' + exc.args[0])\n"
        "print(steps)\n")
    assert result.stdout.strip() == "['SIGINT', 'cleanup went on']", result.stderr


def test_a_signal_during_start_up_exits_143_with_the_message(tmp_path: Path) -> None:
    """Held while the program imports, then raised: never a traceback nor a silent death."""
    # Not a lone --version: that one is answered before anything is imported or installed.
    proc = subprocess.Popen([sys.executable, "-m", "conexa_backup", "-q", "--version"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigterm_pending_after_exec)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip() == "error: interrupted by SIGTERM; partial work was removed"
    assert out == ""


def _sigterm_pending_after_exec() -> None:
    """In the child, before exec: a SIGTERM that has arrived, blocked. A blocked signal stays
    pending across exec, so the program finds it there exactly as if it had come during its
    imports (which run with it blocked)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    os.kill(os.getpid(), signal.SIGTERM)
