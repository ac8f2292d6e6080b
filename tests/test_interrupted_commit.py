"""SIGTERM/SIGINT just as an artifact is complete on a target: nothing of the run stays.

Issue 20: a signal landing after ``uploads.tar.zst`` (or ``database.dump.zst``) was committed
on a target, before the run recorded it, left it there (listed as an incomplete copy) although
the run said "partial work was removed"; a restore's safety backup interrupted so stayed on
every target. The signal is sent at the exact point by the run itself (tests/signal_at.py):
after the first of two targets committed the artifact, or after both did. Each time the run
must exit 128 + the signal with the usual line and the targets must hold exactly what they
held before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Workspace
from tests.test_failures import assert_ok, configure

SIGNAL_AT = Path(__file__).with_name("signal_at.py")


def _two_targets(ws: Workspace) -> Path:
    second = ws.root / "second"
    configure(ws, extra_targets={"second": second})
    return second


def _entries(*roots: Path) -> set[str]:
    """Every file and folder on the targets, hidden ones included."""
    return {f"{root.name}/{p.relative_to(root).as_posix()}"
            for root in roots if root.exists() for p in root.rglob("*")}


def _run_signalled(ws: Workspace, at: str, *args: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(SIGNAL_AT), "--config", str(ws.config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          stdin=subprocess.DEVNULL,
                          env={**os.environ, "SIGNAL_AT": at, **(env or {})})


def _assert_interrupted(result: subprocess.CompletedProcess[str], at: str,
                        said: str = "partial work was removed") -> None:
    sig = signal.Signals[at.rsplit(":", 1)[1]]
    detail = f"exit {result.returncode}\n{result.stderr}"
    assert f"signal_at: {sig.name} at " in result.stderr, f"the point was never reached\n{detail}"
    assert result.returncode == 128 + sig, detail
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: interrupted by {sig.name}; {said}", detail


POINTS = [
    "database.dump.zst:first-target:SIGTERM",
    "database.dump.zst:committed:SIGINT",
    "uploads.tar.zst:first-target:SIGINT",
    "uploads.tar.zst:committed:SIGTERM",
    "uploads.index.jsonl.zst:committed:SIGTERM",
    "manifest.json:first-target:SIGTERM",
]


@pytest.mark.parametrize("at", POINTS)
def test_a_backup_interrupted_as_an_artifact_is_committed_leaves_nothing(
        ws: Workspace, at: str) -> None:
    second = _two_targets(ws)
    before = _entries(ws.backups, second)
    _assert_interrupted(_run_signalled(ws, at, "backup"), at)
    assert _entries(ws.backups, second) == before, f"{at}: something of the run was left"
    staging = ws.state / "staging"
    assert not staging.is_dir() or not any(staging.iterdir()), f"{at}: staging left"
    # The next run is not disturbed by anything of it.
    assert_ok(ws.run("backup"))


def test_what_an_interrupted_backup_cannot_remove_is_named(ws: Workspace) -> None:
    """A target where the clean-up's deletes fail: the line says so instead of "partial work
    was removed", naming the backup and the target; the other target is clean."""
    second = _two_targets(ws)
    at = "uploads.tar.zst:committed:SIGTERM"
    result = _run_signalled(ws, at, "backup", env={"DELETE_FAILS": "second"})
    left = {p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file()}
    assert len(left) == 2, left  # the database dump and the uploads tar
    backup_id = next(iter(left)).split("/")[0]
    _assert_interrupted(result, at, f"backup {backup_id} may be left incomplete on second: "
                        "removing it failed (see the log; prune removes incomplete backups "
                        "once a day old)")
    assert _entries(ws.backups) == set()


@pytest.mark.parametrize("at", ["database.dump.zst:committed:SIGTERM",
                                "uploads.tar.zst:first-target:SIGTERM"])
def test_a_restores_safety_backup_interrupted_half_way_leaves_nothing(
        ws: Workspace, at: str) -> None:
    second = _two_targets(ws)
    backup_id = assert_ok(ws.run("backup")).strip()
    before = _entries(ws.backups, second)
    databases = ws.cluster.databases()
    uploads = sorted(p.relative_to(ws.uploads).as_posix() for p in ws.uploads.rglob("*"))
    _assert_interrupted(_run_signalled(ws, at, "restore", "latest", "--yes"), at)
    assert _entries(ws.backups, second) == before, f"{at}: the safety backup was left"
    assert ws.cluster.databases() == databases  # nothing created, nothing replaced
    assert sorted(p.relative_to(ws.uploads).as_posix() for p in ws.uploads.rglob("*")) == uploads
    # And the restore runs whole afterwards, from the same backup.
    assert_ok(ws.run("restore", backup_id, "--yes"))


def test_a_backup_interrupted_while_pruning_says_it_is_complete(ws: Workspace) -> None:
    """Found by review of issue 20: a signal during the prune that follows a committed backup
    said "partial work was removed", while the backup is complete and stays (as it must)."""
    second = _two_targets(ws)
    at = "prune:start:SIGTERM"
    result = _run_signalled(ws, at, "backup")
    ids = {p.name for p in ws.backups.iterdir() if (p / "manifest.json").exists()}
    assert len(ids) == 1 and (second / next(iter(ids)) / "manifest.json").exists(), ids
    _assert_interrupted(result, at, f"backup {next(iter(ids))} is complete on local, second and "
                        "kept; the prune after it was interrupted (the next one finishes it)")
    assert ws.run("verify", "latest").returncode == 0
