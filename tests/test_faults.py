"""Fault injection: the tool is killed, disks fill up, copies go bad; backups survive.

Each scenario is repeatable: the random moments come from a seeded generator whose seed is
printed (``CONEXA_FAULT_SEED`` replays a run) and the number of trials is
``CONEXA_FAULT_TRIALS`` (default 6). The figures (trials, faults survived, data lost) are
printed at the end of the module and, when ``CONEXA_FAULT_REPORT`` names a file, written there
as JSON.

After every SIGKILL (of ``backup``, ``prune`` or an in-place ``restore``, at a random moment
between 0 and the measured duration of a normal run):

- every backup listed as complete passes ``verify``, and every backup that was complete before
  still is (anything else counts as data lost);
- the live database and uploads are each either untouched or fully restored;
- the lock never blocks the next run, and the next ``backup`` succeeds.

Deterministic kills at the two dangerous moments of an in-place restore, and disk-full and
corrupted-copy cases, follow.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conexa_backup.state import restore_pending
from conexa_backup.testing.compare import plain_dump, tree_snapshot
from conexa_backup.testing.sample import make_uploads_tree
from tests.conftest import Workspace
from tests.test_failures import (  # noqa: F401 - small_tmpfs is a fixture
    assert_error,
    assert_ok,
    cli_argv,
    configure,
    listed_by_id,
    make_bin_dir,
    processes_with_env,
    small_tmpfs,
    temp_files,
    tmpfs,
    wait_for,
)

TRIALS = int(os.environ.get("CONEXA_FAULT_TRIALS", "6"))
SEED = int(os.environ.get("CONEXA_FAULT_SEED", str(int(time.time()) % 1_000_000)))


# -- figures ----------------------------------------------------------------------------------

@dataclass
class Figures:
    """What one scenario went through."""

    scenario: str
    seed: int
    trials: int = 0
    killed_mid_run: int = 0  # the run was still going when SIGKILL came
    finished_first: int = 0  # the run ended before its random moment
    survived: int = 0  # every invariant held after the fault
    data_lost: int = 0  # backups (or live data) lost or damaged
    notes: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def start(self) -> tuple[int, int]:
        """A trial begins; returns what :meth:`end` compares with."""
        self.trials += 1
        return len(self.problems), self.data_lost

    def end(self, mark: tuple[int, int]) -> None:
        """A trial survived when it added no problem and lost nothing."""
        if (len(self.problems), self.data_lost) == mark:
            self.survived += 1

    def line(self) -> str:
        notes = ", ".join(f"{k}: {v}" for k, v in sorted(self.notes.items()))
        return (f"{self.scenario}: seed {self.seed}, trials {self.trials} (killed mid-run "
                f"{self.killed_mid_run}, finished first {self.finished_first}), faults "
                f"survived {self.survived}/{self.trials}, data lost {self.data_lost}, "
                f"{self.seconds:.0f} s"
                + (f"; {notes}" if notes else ""))


FIGURES: list[Figures] = []


def _say(request: pytest.FixtureRequest, text: str) -> None:
    """Print past pytest's output capture (the figures are the point of these tests)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line(text)


@pytest.fixture(scope="module", autouse=True)
def _fault_report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if not FIGURES:
        return
    _say(request, "")
    _say(request, f"fault injection (CONEXA_FAULT_SEED={SEED}, CONEXA_FAULT_TRIALS={TRIALS}):")
    for figures in FIGURES:
        _say(request, "  " + figures.line())
    total = (sum(f.trials for f in FIGURES), sum(f.survived for f in FIGURES),
             sum(f.data_lost for f in FIGURES))
    _say(request, f"  total: {total[0]} trials, {total[1]} faults survived, "
                  f"{total[2]} data lost")
    out = os.environ.get("CONEXA_FAULT_REPORT")
    if out:
        data = [{**asdict(f), "notes": dict(f.notes)} for f in FIGURES]
        Path(out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Figures]]:
    """A Figures recorder for the test; printed when the test ends."""
    made: list[Figures] = []
    t0 = time.monotonic()

    def make(scenario: str) -> Figures:
        f = Figures(scenario, SEED)
        made.append(f)
        FIGURES.append(f)
        _say(request, f"\n{scenario}: seed {SEED} (replay with CONEXA_FAULT_SEED={SEED})")
        return f

    yield make
    for f in made:
        f.seconds = time.monotonic() - t0
        _say(request, f.line())


# -- helpers ----------------------------------------------------------------------------------

def rng_for(scenario: str) -> random.Random:
    return random.Random(f"{SEED}-{scenario}")


def run_killed_after(ws: Workspace, args: list[str], delay: float,
                     env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Run the CLI; SIGKILL it ``delay`` seconds in (if still running). Returns (killed,
    marker); the marker is in the environment of the run and of its children."""
    marker = f"conexa-fault-{uuid.uuid4().hex}"
    proc = subprocess.Popen(cli_argv(ws, *args),
                            env={**os.environ, **(env or {}), "CONEXA_FAULT_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True, marker
    return False, marker


def run_killed_when(ws: Workspace, args: list[str], moment: Callable[[], bool],
                    timeout: float = 60) -> tuple[bool, str]:
    """Run the CLI; SIGKILL it as soon as ``moment()`` is true (polled continuously)."""
    marker = f"conexa-fault-{uuid.uuid4().hex}"
    proc = subprocess.Popen(cli_argv(ws, *args), env={**os.environ, "CONEXA_FAULT_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if moment():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True, marker
    proc.kill()
    proc.wait()
    return False, marker


CHILDREN_GRACE = 2.0  # seconds: a killed run's children die with it (deathsig.py)


def reap(marker: str, f: Figures, where: str) -> None:
    """Every process of the killed run (pg_dump, pg_restore... started with ``marker`` in
    their environment) must be gone within :data:`CHILDREN_GRACE` seconds: each child gets a
    signal when the tool dies. One still running then is a problem (and is killed, so that
    the next trial starts clean)."""
    deadline = time.monotonic() + CHILDREN_GRACE
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_with_env(marker)
    if not left:
        return
    f.notes["children outlived the tool"] += 1
    f.problems.append(f"{where}: {len(left)} process(es) of the killed run still running "
                      f"{CHILDREN_GRACE} s after the kill")
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def complete(entries: dict[str, dict[str, Any]]) -> set[str]:
    return {i for i, e in entries.items() if e["status"] == "complete"}


def verify_all(ws: Workspace) -> dict[str, bool]:
    """``verify --all``: id -> every copy ok."""
    result = ws.run("verify", "--all", "--json")
    assert result.returncode in (0, 1) and result.stdout, result.stderr
    oks: dict[str, bool] = {}
    for check in json.loads(result.stdout)["checks"]:
        oks[check["id"]] = oks.get(check["id"], True) and check["ok"]
    return oks


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    value = fn()
    return value, time.monotonic() - t0


def check_backups(ws: Workspace, good: set[str], f: Figures, where: str) -> set[str]:
    """Every listed complete backup verifies; every backup in ``good`` is still complete.
    Returns the complete backups. Problems go to ``f``."""
    entries = listed_by_id(ws)
    now = complete(entries)
    damaged = sorted(i for i, e in entries.items() if e["status"] == "damaged")
    lost = sorted(good - now)
    oks = verify_all(ws)
    failing = sorted(i for i in now if not oks.get(i, False))
    if lost or failing or damaged:
        f.data_lost += len(set(lost) | set(failing) | set(damaged))
        f.problems.append(f"{where}: lost {lost}, failing verify {failing}, damaged {damaged}")
    return now


def next_backup(ws: Workspace, f: Figures, where: str, *args: str) -> str | None:
    result = ws.run("backup", *args)
    if result.returncode != 0:
        f.problems.append(f"{where}: next backup exit {result.returncode}: "
                          f"{result.stderr.strip()}")
        return None
    return result.stdout.strip()


# -- SIGKILL during backup --------------------------------------------------------------------

def test_sigkill_during_backup(ws: Workspace, tmp_path: Path,
                               figures: Callable[[str], Figures]) -> None:
    f = figures("SIGKILL during backup")
    rng = rng_for("backup")
    # Something to interrupt: more uploads, and a pg_dump that pauses after its first bytes.
    make_uploads_tree(ws.uploads / "bulk", files=80, seed=5, incompressible_kib=128)
    slow = make_bin_dir(tmp_path / "slow bin",
                        '"$REAL" "$@" | { head -c 65536; sleep 0.4; cat; }')
    configure(ws, bin_dir=slow)
    first, duration = timed(lambda: assert_ok(ws.run("backup")).strip())
    good = {first}
    for trial in range(TRIALS):
        where = f"trial {trial}"
        mark = f.start()
        delay = rng.uniform(0, duration)
        killed, marker = run_killed_after(ws, ["backup"], delay)
        f.killed_mid_run += killed
        f.finished_first += not killed
        reap(marker, f, where)
        now = check_backups(ws, good, f, where)
        f.notes["killed runs left complete"] += len(now - good)
        made = next_backup(ws, f, where)
        if made is not None:
            good = (now | {made}) & {i for i, ok in verify_all(ws).items() if ok}
        f.end(mark)
    # What the killed runs left on the target that no later run removed (each backup sweeps
    # the temporaries of runs that are gone: there should be none).
    assert_ok(ws.run("prune"))
    leftovers = temp_files(ws.backups)
    if leftovers:
        f.notes["temporary files never removed"] = len(leftovers)
        f.notes["temporary files never removed (bytes)"] = sum(p.stat().st_size
                                                               for p in leftovers)
    assert f.problems == [], "\n".join(f.problems)
    assert f.data_lost == 0


# -- SIGKILL during prune ---------------------------------------------------------------------

def clone_backup(ws: Workspace, template: str, new_id: str) -> None:
    """A copy of ``template`` under another id (cheap stand-ins for older backups)."""
    shutil.copytree(ws.backups / template, ws.backups / new_id)
    manifest = ws.backups / new_id / "manifest.json"
    data = json.loads(manifest.read_bytes())
    data["id"] = new_id
    manifest.write_bytes(json.dumps(data, indent=2).encode() + b"\n")


def old_ids(batch: int, count: int) -> list[str]:
    base = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=batch)
    return [(base + timedelta(hours=h)).strftime("%Y%m%dT%H%M%SZ") for h in range(count)]


def test_sigkill_during_prune(ws: Workspace, figures: Callable[[str], Figures]) -> None:
    f = figures("SIGKILL during prune")
    rng = rng_for("prune")
    configure(ws)
    with ws.config.open("a", encoding="utf-8") as fh:
        fh.write("[retention]\nkeep_last = 1\nprune_after_backup = false\n")
    newest = assert_ok(ws.run("backup")).strip()
    for backup_id in old_ids(0, 6):
        clone_backup(ws, newest, backup_id)
    assert len(complete(listed_by_id(ws))) == 7
    _, duration = timed(lambda: assert_ok(ws.run("prune")))
    assert complete(listed_by_id(ws)) == {newest}

    # Random moments, then (half as many) kills the moment deleting has begun: a prune spends
    # most of its time starting and listing, the deletes take a few milliseconds.
    for trial in range(TRIALS + TRIALS // 2):
        where = f"trial {trial}"
        mark = f.start()
        batch = old_ids(trial + 1, 6)
        for backup_id in batch:
            clone_backup(ws, newest, backup_id)
        if trial < TRIALS:
            killed, marker = run_killed_after(ws, ["prune"], rng.uniform(0, duration))
        else:
            f.notes["kills as deleting began"] += 1
            first = ws.backups / batch[0] / "manifest.json"
            killed, marker = run_killed_when(ws, ["prune"], lambda m=first: not m.exists())
        f.killed_mid_run += killed
        f.finished_first += not killed
        reap(marker, f, where)
        now = check_backups(ws, {newest}, f, where)
        f.notes["clones still complete after the kill"] += len(now & set(batch))
        half = [i for i in batch if i not in now and (ws.backups / i).exists()]
        f.notes["half-deleted leftovers"] += len(half)
        made = next_backup(ws, f, where, "--no-prune")
        if made is not None:
            newest = made
        finished = ws.run("prune")
        if finished.returncode != 0:
            f.problems.append(f"{where}: prune after the kill: exit {finished.returncode}: "
                              f"{finished.stderr.strip()}")
        empty = {p.name for p in ws.backups.iterdir() if not any(p.iterdir())}
        f.notes["empty backup folders left"] = len(empty)
        remaining = {p.name for p in ws.backups.iterdir()} - empty
        # keep_last = 1, and the newest verified backup is protected too: at most two stay.
        if newest not in remaining or len(remaining) > 2 or remaining & set(batch):
            f.problems.append(f"{where}: after a full prune the target holds {remaining}")
        check_backups(ws, {newest}, f, where + " after prune")
        f.end(mark)
    assert f.problems == [], "\n".join(f.problems)
    assert f.data_lost == 0


# -- SIGKILL during an in-place restore -------------------------------------------------------

@dataclass
class LiveState:
    backup_id: str
    dump: str
    tree: dict[str, Any]


def _change_live(ws: Workspace) -> None:
    """The incident between two backups: rows changed, a table dropped, files changed."""
    ws.cluster.execute("UPDATE students SET nome = nome || ' (alterado)' "
                       "WHERE id % 3 = 0; DELETE FROM grades WHERE id % 2 = 0; "
                       "DROP TABLE attendance CASCADE", ws.dbname)
    shutil.rmtree(ws.uploads / "fotos")
    (ws.uploads / "novo relatório.txt").write_text("criado depois do backup\n",
                                                   encoding="utf-8")


def _live_db_state(ws: Workspace) -> str | None:
    """The live database's plain dump, or None if it cannot be dumped (e.g. it refuses
    connections)."""
    try:
        return plain_dump(ws.cluster.env(), ws.dbname)
    except RuntimeError:
        return None


def _allows_connections(ws: Workspace, name: str) -> bool | None:
    with psycopg.connect(ws.cluster.url("postgres"), autocommit=True) as conn:
        row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s",
                           (name,)).fetchone()
    return None if row is None else bool(row[0])


def _reopen(ws: Workspace, name: str) -> None:
    with psycopg.connect(ws.cluster.url("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
            sql.Identifier(name)))


def _leftovers(ws: Workspace) -> dict[str, int]:
    staging = ws.state / "staging"
    return {
        "restoring databases": sum("__restoring_" in d for d in ws.cluster.databases()
                                   if d.startswith(ws.dbname)),
        "hidden uploads folders": sum(p.name.startswith(f".{ws.uploads.name}.")
                                      for p in ws.uploads.parent.iterdir()),
        "staging files": len(list(staging.iterdir())) if staging.exists() else 0,
    }


def test_sigkill_during_in_place_restore(ws: Workspace,
                                         figures: Callable[[str], Figures]) -> None:
    f = figures("SIGKILL during in-place restore")
    rng = rng_for("restore")
    a = LiveState(assert_ok(ws.run("backup")).strip(), plain_dump(ws.cluster.env(), ws.dbname),
                  tree_snapshot(ws.uploads))
    _change_live(ws)
    b = LiveState(assert_ok(ws.run("backup")).strip(), plain_dump(ws.cluster.env(), ws.dbname),
                  tree_snapshot(ws.uploads))
    assert a.dump != b.dump and a.tree != b.tree
    _, duration = timed(lambda: assert_ok(ws.run("restore", a.backup_id, "--yes")))
    assert plain_dump(ws.cluster.env(), ws.dbname) == a.dump
    assert tree_snapshot(ws.uploads) == a.tree
    live, other = a, b
    good = complete(listed_by_id(ws))

    for trial in range(TRIALS):
        where = f"trial {trial}"
        mark = f.start()
        killed, marker = run_killed_after(ws, ["restore", other.backup_id, "--yes"],
                                          rng.uniform(0, duration))
        f.killed_mid_run += killed
        f.finished_first += not killed
        reap(marker, f, where)

        if _allows_connections(ws, ws.dbname) is False:  # the swap never closes it
            f.problems.append(f"{where}: live database left refusing connections")
            _reopen(ws, ws.dbname)
        dump = _live_db_state(ws)
        tree = tree_snapshot(ws.uploads) if ws.uploads.is_dir() else None
        db_is = {live.dump: "untouched", other.dump: "restored"}.get(dump or "", "BROKEN")
        tree_is = {_key(live.tree): "untouched", _key(other.tree): "restored"}.get(
            _key(tree), "BROKEN")
        f.notes[f"database {db_is}"] += 1
        f.notes[f"uploads {tree_is}"] += 1
        if "BROKEN" in (db_is, tree_is):
            f.data_lost += 1
            f.problems.append(f"{where}: live database {db_is}, uploads {tree_is}")
        elif db_is != tree_is:  # killed between the two swaps: the next run's journal repairs
            f.notes["database and uploads from different backups until the next run"] += 1
        trial_left = _leftovers(ws)
        for what, n in trial_left.items():
            f.notes[f"trials leaving {what}"] += n > 0
        if restore_pending(ws.state):  # every reader of the state says so (issue 20)
            f.notes["trials leaving a pending journal"] += 1
            if (status := ws.run("status")).returncode != 2:
                f.problems.append(f"{where}: a pending journal, and status exit "
                                  f"{status.returncode}, not CRITICAL")

        good = check_backups(ws, good, f, where)
        made = next_backup(ws, f, where, "--no-prune")
        if made is not None:
            good.add(made)
        # The next locked run settles the journal and removes what the killed run left.
        left = {what: n for what, n in _leftovers(ws).items() if n}
        if left:
            f.problems.append(f"{where}: left after the next locked run: {left}")
        elif any(trial_left.values()):
            f.notes["trials whose leftovers the next run removed"] += 1
        # Make the live state whole again (one of the two), for the next trial.
        if db_is == tree_is == "restored":
            live, other = other, live
        elif db_is != "untouched" or tree_is != "untouched":
            result = ws.run("restore", other.backup_id, "--yes", "--no-safety-backup")
            if result.returncode != 0:
                f.problems.append(f"{where}: restore after the kill: {result.stderr.strip()}")
            live, other = other, live
        f.end(mark)
    # Leftovers go once the same backup is restored again in full.
    for state in (other, live):
        assert_ok(ws.run("restore", state.backup_id, "--yes", "--no-safety-backup"))
    assert plain_dump(ws.cluster.env(), ws.dbname) == live.dump
    f.notes.update({f"{k} after two full restores": v for k, v in _leftovers(ws).items() if v})
    assert f.problems == [], "\n".join(f.problems)
    assert f.data_lost == 0


def _key(tree: dict[str, Any] | None) -> str:
    return json.dumps(tree, sort_keys=True) if tree is not None else ""


# -- deterministic kills at the dangerous moments --------------------------------------------


@contextlib.contextmanager
def app_session(ws: Workspace) -> Iterator[None]:
    """The application holding a connection to the live database (as it always does)."""
    conn = psycopg.connect(ws.cluster.url(ws.dbname), autocommit=True)
    try:
        conn.execute("SELECT 1")
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.close()


def _restorable_pair(ws: Workspace) -> tuple[LiveState, LiveState]:
    """Backup A, then the live state changed to B (backed up too)."""
    a = LiveState(assert_ok(ws.run("backup")).strip(), plain_dump(ws.cluster.env(), ws.dbname),
                  tree_snapshot(ws.uploads))
    _change_live(ws)
    b = LiveState(assert_ok(ws.run("backup")).strip(), plain_dump(ws.cluster.env(), ws.dbname),
                  tree_snapshot(ws.uploads))
    return a, b


def test_sigkill_between_the_uploads_and_database_swaps(ws: Workspace) -> None:
    a, b = _restorable_pair(ws)
    kept = f"{ws.uploads.name}.before-restore-"
    with app_session(ws):
        killed, marker = run_killed_when(
            ws, ["restore", a.backup_id, "--yes"],
            lambda: any(p.name.startswith(kept) for p in ws.uploads.parent.iterdir()))
    if not killed:
        pytest.skip("the restore finished before the moment was seen")
    wait_for(lambda: not processes_with_env(marker), CHILDREN_GRACE,
             "the killed run's children")
    assert _allows_connections(ws, ws.dbname) is not False  # the swap never closes it
    # Until a locked run settles it, every reader of the state says so (issue 20).
    status, listed = ws.run("status"), ws.run("list")
    assert status.returncode == 2 and "an interrupted restore left uploads and database " \
        "from different backups" in status.stdout, status.stdout
    assert listed.returncode == 1 and "interrupted restore" in listed.stderr, listed.stderr
    # The next run may repair what the killed one left: give it the chance.
    assert_ok(ws.run("backup", "--no-prune"))
    state = (plain_dump(ws.cluster.env(), ws.dbname), _key(tree_snapshot(ws.uploads)))
    assert state in ((a.dump, _key(a.tree)), (b.dump, _key(b.tree))), (
        "database from " + ("A" if state[0] == a.dump else "B" if state[0] == b.dump else "?")
        + ", uploads from " + ("A" if state[1] == _key(a.tree) else "B"
                               if state[1] == _key(b.tree) else "?"))


def test_killed_restore_leaves_no_dump_in_staging(ws: Workspace) -> None:
    a, b = _restorable_pair(ws)
    staging = ws.state / "staging"
    killed, marker = run_killed_when(
        ws, ["restore", a.backup_id, "--yes"],
        lambda: staging.exists() and any("database.dump" in p.name
                                         for p in staging.iterdir()))
    assert killed
    wait_for(lambda: not processes_with_env(marker), 30, "the killed run's children")
    assert plain_dump(ws.cluster.env(), ws.dbname) == b.dump  # untouched
    assert_ok(ws.run("restore", a.backup_id, "--yes"))
    assert plain_dump(ws.cluster.env(), ws.dbname) == a.dump
    assert sorted(p.name for p in staging.iterdir()) == []


def test_killed_backup_leaves_nothing_forever(ws: Workspace, tmp_path: Path) -> None:
    started = tmp_path / "pg_dump streaming"
    body = f'"$REAL" "$@" | {{ head -c 65536; touch "{started}"; sleep 5; cat; }}'
    configure(ws, bin_dir=make_bin_dir(tmp_path / "slow bin", body))
    killed, marker = run_killed_when(ws, ["backup"], started.exists)
    assert killed
    wait_for(lambda: not processes_with_env(marker), 30, "pg_dump to exit")
    folders = [p for p in ws.backups.iterdir() if p.is_dir()]
    assert len(folders) == 1 and temp_files(folders[0]), list(ws.backups.rglob("*"))
    # Time passes: the leftover is now three days old (its id says so); prune runs.
    old = (datetime.now(UTC) - timedelta(days=3)).strftime("%Y%m%dT%H%M%SZ")
    folders[0].rename(ws.backups / old)
    configure(ws)
    assert_ok(ws.run("backup"))
    assert_ok(ws.run("prune"))
    assert temp_files(ws.backups) == []
    assert not (ws.backups / old).exists()


# -- disks that fill up, copies that go bad ---------------------------------------------------

def test_target_filling_up_mid_upload(ws: Workspace, tmp_path: Path,
                                     small_tmpfs: Path) -> None:  # noqa: F811
    """A 1 MiB target next to a good one: exit 3, the good copy restores, nothing left on the
    full one."""
    big = tmp_path / "big uploads"
    make_uploads_tree(big, files=100, seed=3, incompressible_kib=128)
    full = small_tmpfs / "backups"
    configure(ws, uploads=big, extra_targets={"tiny": full})
    result = ws.run("backup", "--json")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["targets"] == ["local"]
    assert "no space left" in report["failed_targets"]["tiny"].lower(), report
    assert "tiny" in result.stderr and "no space left" in result.stderr.lower()
    backup_id = report["id"]
    entry = {e["id"]: e for e in json.loads(assert_ok(ws.run("list", "--json")))}[backup_id]
    assert (entry["status"], entry["targets"]) == ("complete", ["local"])
    assert [p for p in full.rglob("*") if p.is_file()] == []  # the failed copy was removed
    assert_ok(ws.run("verify", backup_id))

    target, dest = f"{ws.dbname}_from_good", tmp_path / "restored uploads"
    assert_ok(ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                     "--yes"))
    assert plain_dump(ws.cluster.env(), target) == plain_dump(ws.cluster.env(), ws.dbname)
    assert tree_snapshot(dest) == tree_snapshot(big)


def test_corrupted_local_copy_falls_back_to_s3(ws: Workspace, tmp_path: Path,
                                               s3_server: Any) -> None:
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    ws.write_config(f'[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "conexa-test"\n'
                    f'prefix = "{prefix}"\nendpoint_url = "{s3_server.endpoint}"\nretries = 2\n')
    backup_id = json.loads(assert_ok(ws.run("backup", "--json")))["id"]
    # The local disk returns other bytes than were written (same sizes).
    for name in ("database.dump.zst", "uploads.tar.zst"):
        path = ws.backups / backup_id / name
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 32):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))
    bad = ws.run("verify", backup_id, "--json")
    assert bad.returncode == 1
    assert {c["target"]: c["ok"] for c in json.loads(bad.stdout)["checks"]} == {
        "local": False, "s3": True}

    target, dest = f"{ws.dbname}_from_s3", tmp_path / "uploads from s3"
    assert_ok(ws.run("restore", backup_id, "--to-database", target, "--uploads-to", str(dest),
                     "--yes"))
    assert plain_dump(ws.cluster.env(), target) == plain_dump(ws.cluster.env(), ws.dbname)
    assert tree_snapshot(dest) == tree_snapshot(ws.uploads)
    # verify recorded the local copy damaged: the restore reads S3 first, never the bad copy.
    log = "".join(p.read_text(encoding="utf-8") for p in (ws.state / "logs").iterdir())
    assert "unusable" not in log, log[-2000:]
    # In place too: the live system ends up exactly as backed up.
    live_dump, live_tree = plain_dump(ws.cluster.env(), ws.dbname), tree_snapshot(ws.uploads)
    ws.cluster.execute("DELETE FROM grades", ws.dbname)
    shutil.rmtree(ws.uploads / "documentos")
    assert_ok(ws.run("restore", backup_id, "--yes"))
    assert plain_dump(ws.cluster.env(), ws.dbname) == live_dump
    assert tree_snapshot(ws.uploads) == live_tree



def test_staging_disk_full_during_restore(ws: Workspace, tmp_path: Path) -> None:
    """state_dir on a 1 MiB tmpfs: the decompressed dump does not fit. The restore fails,
    saying so; the live database is untouched and staging is empty."""
    # A few MB of rows: pg_dump's uncompressed custom format holds them as they are.
    ws.cluster.execute("CREATE TABLE public.filler AS SELECT g AS id, repeat(md5(g::text), 40) "
                       "AS t FROM generate_series(1, 3000) AS g", ws.dbname)
    with tmpfs(tmp_path / "small state", "1m", mode="0700") as state:
        ws.state = state
        configure(ws)
        backup_id = json.loads(assert_ok(ws.run("backup", "--json")))["id"]
        unpacked = subprocess.run(["zstd", "-dc", str(ws.backups / backup_id /
                                                      "database.dump.zst")],
                                  capture_output=True, check=True).stdout
        assert len(unpacked) > 2 << 20, len(unpacked)  # surely more than the tmpfs holds
        live_dump, live_tree = plain_dump(ws.cluster.env(), ws.dbname), tree_snapshot(ws.uploads)
        dbs = ws.cluster.databases()

        result = ws.run("restore", backup_id, "--yes")
        assert_error(result, 1, "no space left")
        assert plain_dump(ws.cluster.env(), ws.dbname) == live_dump
        assert tree_snapshot(ws.uploads) == live_tree
        assert sorted(set(ws.cluster.databases()) - set(dbs)) == []
        assert list((state / "staging").iterdir()) == []
        assert [p.name for p in ws.uploads.parent.iterdir() if p.name.startswith(".")] == []
        # Side by side, too.
        target = f"{ws.dbname}_nospace"
        assert_error(ws.run("restore", backup_id, "--only", "database", "--to-database",
                            target, "--yes"), 1, "no space left")
        assert target not in ws.cluster.databases()
        assert list((state / "staging").iterdir()) == []
        # Once there is room (state_dir elsewhere), the same backup restores.
    ws.state = tmp_path / "state"
    configure(ws)
    assert_ok(ws.run("restore", backup_id, "--only", "database", "--to-database", target,
                     "--yes"))
    assert plain_dump(ws.cluster.env(), target) == live_dump
