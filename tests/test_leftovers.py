"""Nothing a killed run created outlives it unnoticed (issue 20).

- The ``__restoring_`` database and ``.restoring-`` folder of a restore killed outright, and a
  drill's throwaway database, are removed by the next locked run; a live run's are kept, and
  nothing outside our names is ever touched.
- A pending restore journal (killed between the two swaps) is CRITICAL in ``status`` and a
  failure in ``list`` until ``recover`` (or any locked run) settles it.
- Incomplete copies (a prune or backup killed half-way) are counted and sized by ``list`` and
  ``status``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conexa_backup.actions import journal, restore_db, restore_uploads
from conexa_backup.testing.compare import tree_snapshot
from tests.conftest import Workspace
from tests.test_failures import (
    REAL_BIN,
    _q,
    assert_ok,
    cli_argv,
    configure,
    processes_with_env,
    wait_for,
)

PENDING = "an interrupted restore left uploads and database from different backups"


def _backup(ws: Workspace) -> str:
    return assert_ok(ws.run("backup", "--no-prune")).strip()


def _restoring(ws: Workspace) -> list[str]:
    return sorted(d for d in ws.cluster.databases()
                  if d.startswith(ws.dbname[:20]) and "__restoring_" in d)


def _hidden(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.uploads.parent.iterdir() if ".restoring-" in p.name)


def _slow_restore_bin(folder: Path, loaded: Path) -> Path:
    """A ``bin_dir`` whose ``pg_restore`` loads the database, touches ``loaded``, then
    waits (as a long load would): the moment to kill the restore is then certain."""
    folder.mkdir(parents=True)
    script = folder / "pg_restore"
    real = REAL_BIN / "pg_restore"
    script.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = "--version" ]; then exec {_q(real)} "$@"; fi\n'
        f'{_q(real)} "$@" || exit $?\n'
        f"touch {_q(loaded)}\n"
        "exec sleep 60\n", encoding="utf-8")
    script.chmod(0o755)
    for tool in ("pg_dump", "pg_dumpall", "psql"):
        (folder / tool).symlink_to(REAL_BIN / tool)
    return folder


def _kill_marked(marker: str) -> None:
    """SIGKILL what the killed run left running (its children), and wait until it is gone."""
    for pid in processes_with_env(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not processes_with_env(marker), 10, "the killed run's children")


def test_a_restore_killed_while_loading_leaves_nothing_after_the_next_locked_run(
        ws: Workspace, tmp_path: Path) -> None:
    backup_id = _backup(ws)
    loaded = tmp_path / "loaded"
    configure(ws, bin_dir=_slow_restore_bin(tmp_path / "bin", loaded))
    marker = f"conexa-leftovers-{os.getpid()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(cli_argv(ws, "restore", backup_id, "--yes", "--no-safety-backup"),
                            env={**os.environ, "CONEXA_FAULT_MARK": marker},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: loaded.exists() or proc.poll() is not None, 60, "pg_restore's load")
        assert proc.poll() is None, "the restore ended before its database was loaded"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_marked(marker)
    assert len(_restoring(ws)) == 1  # what the kill left: a whole loaded database

    configure(ws)
    assert_ok(ws.run("backup", "--no-prune"))  # any locked run

    assert _restoring(ws) == []
    assert _hidden(ws) == []
    assert not list((ws.state / "leftovers").glob("*"))


@contextlib.contextmanager
def _claimer(ws: Workspace, backup_id: str, *, live: bool) -> Iterator[dict[str, Any]]:
    """A process that records a restore's database and folder and a drill's database as a
    restore and a drill do, then exits at once (``live=False``: its run is gone) or stays
    until the block ends. The databases and folder are then created here, as the run would
    have; yields their names."""
    code = f"""
import json, os, sys
from pathlib import Path
from conexa_backup.actions import leftovers, restore_db, restore_uploads
state, live_db, uploads = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
names = {{
    "db": restore_db.derived_name(live_db, "__restoring_{backup_id}_p%d" % os.getpid()),
    "drill": "conexa_drill_{backup_id.lower()}_%d" % os.getpid(),
    "folder": str(restore_uploads.staging_path(uploads, "{backup_id}")),
}}
leftovers.claim(state, "restore", databases=[("db", names["db"])],
                folders=[Path(names["folder"])])
leftovers.claim(state, "drill", databases=[("drill", names["drill"])])
print(json.dumps(names), flush=True)
if {live!r}:
    sys.stdin.read()
"""
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.state), ws.dbname,
                             str(ws.uploads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        names: dict[str, Any] = json.loads(proc.stdout.readline())
        if not live:
            assert proc.wait(timeout=30) == 0
        ws.cluster.create_database(names["db"])
        ws.cluster.create_database(names["drill"])
        Path(names["folder"]).mkdir()
        (Path(names["folder"]) / "half-extracted.pdf").write_bytes(b"%PDF")
        yield names
    finally:
        if proc.poll() is None:
            proc.communicate("", timeout=30)
        for name in ws.cluster.databases():
            if name.endswith((f"_{proc.pid}", f"_p{proc.pid}")):
                ws.cluster.drop_database(name)


def test_a_dead_runs_recorded_databases_and_folder_go_a_live_runs_stay(ws: Workspace) -> None:
    backup_id = _backup(ws)
    with _claimer(ws, backup_id, live=False) as dead, \
            _claimer(ws, backup_id, live=True) as live:
        # A record naming what is not ours (the live database and folder) is never acted
        # on, even once it is old enough to be swept.
        forged = ws.state / "leftovers" / "forged.1@elsewhere"
        forged.write_text(json.dumps({"databases": [{"server": "db", "name": ws.dbname}],
                                      "folders": [str(ws.uploads)]}))
        two_days_ago = time.time() - 2 * 86400
        os.utime(forged, (two_days_ago, two_days_ago))
        result = ws.run("recover", "--json")
        assert_ok(result)
        removed = json.loads(result.stdout)["removed"]
        assert sorted(removed) == sorted([dead["db"], dead["drill"], dead["folder"]])
        databases = ws.cluster.databases()
        assert dead["db"] not in databases and dead["drill"] not in databases
        assert not Path(dead["folder"]).exists()
        # The live run's are all still there, and so is everything else.
        assert live["db"] in databases and live["drill"] in databases
        assert Path(live["folder"]).is_dir()
        assert ws.dbname in databases and ws.uploads.is_dir()
        # Once it is gone too, the next locked run removes its leftovers as well.
    assert_ok(ws.run("recover"))
    assert not set(live.values()) & (ws.cluster.databases() | set(_hidden(ws)))


def test_an_interrupt_just_after_create_database_leaves_no_restoring_database(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal landing after CREATE DATABASE, before the restore noted the name (here:
    while the fetched dump is discarded), used to leave an empty one behind for good."""
    backup_id = _backup(ws)

    def interrupted(self: restore_db.StagedDump) -> None:
        restore_db.discard(self.path)
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(restore_db.StagedDump, "discard", interrupted)
    ws.cli("restore", backup_id, "--yes", "--no-safety-backup")
    assert _restoring(ws) == []


def _interrupted_between_swaps(ws: Workspace, backup_id: str) -> Path:
    """The state a restore killed between the uploads swap and the database swap leaves:
    the journal, the restored uploads live (the old ones kept aside), the restored database
    loaded but not swapped in. Returns where the old uploads are."""
    restored = restore_db.derived_name(ws.dbname, f"__restoring_{backup_id}_p1")
    ws.cluster.execute(f'CREATE DATABASE "{restored}" TEMPLATE "{ws.dbname}"')
    staged = ws.uploads.parent / f".{ws.uploads.name}.restoring-{backup_id}.1@x"
    staged.mkdir()
    (staged / "restored.txt").write_text("from the backup")
    kept = ws.uploads.with_name(f"{ws.uploads.name}.before-restore-{backup_id}")
    journal.begin(ws.state, uploads=ws.uploads, staged=staged, kept_uploads=kept,
                  live_db=ws.dbname, restored_db=restored,
                  keep_db=restore_db.derived_name(ws.dbname, "__before_restore_x"))
    restore_uploads.swap_in(staged, ws.uploads, kept)
    return kept


def test_a_pending_journal_is_critical_until_recover_settles_it(ws: Workspace) -> None:
    backup_id = _backup(ws)
    before = tree_snapshot(ws.uploads)
    _interrupted_between_swaps(ws, backup_id)
    assert tree_snapshot(ws.uploads) != before

    status = ws.run("status")
    assert status.returncode == 2, status.stdout + status.stderr
    assert status.stdout.startswith("CONEXA-BACKUP CRITICAL - " + PENDING)
    assert "`conexa-backup recover`" in status.stdout
    as_json = json.loads(ws.run("status", "--json").stdout)
    assert as_json["code"] == 2 and as_json["restore_pending"] is True
    assert PENDING in as_json["summary"]
    listing = ws.run("list")
    assert listing.returncode == 1 and PENDING in listing.stderr, listing.stderr
    assert backup_id in listing.stdout  # the table is still shown
    listing = ws.run("list", "--json")
    assert listing.returncode == 1 and PENDING in listing.stderr
    assert [e["id"] for e in json.loads(listing.stdout)] == [backup_id]
    # The metrics file, written by runs that take no lock (verify, drills), says it too.
    prom = ws.root / "conexa.prom"
    ws.config.write_text(ws.config.read_text() + f'[monitoring]\nmetrics_file = "{prom}"\n')
    ws.run("verify", backup_id)
    assert "conexa_backup_restore_pending 1\n" in prom.read_text()

    result = ws.run("recover", "--json")
    assert_ok(result)
    assert "rolled back" in json.loads(result.stdout)["journal"]
    assert tree_snapshot(ws.uploads) == before
    assert _restoring(ws) == [] and _hidden(ws) == []
    status = ws.run("status", "--json")
    assert PENDING not in status.stdout and json.loads(status.stdout)["code"] != 2
    assert ws.run("list").returncode == 0
    ws.run("verify", backup_id)
    assert "conexa_backup_restore_pending 0\n" in prom.read_text()
    nothing = ws.run("recover")
    assert_ok(nothing)
    assert nothing.stdout.strip() == "nothing to recover"


def test_incomplete_copies_are_counted_and_sized(ws: Workspace) -> None:
    ids = [_backup(ws) for _ in range(3)]
    # A prune killed half-way: the manifest goes first, some artifacts stay.
    sizes = 0
    for backup_id in ids[:2]:
        (ws.backups / backup_id / "manifest.json").unlink()
        sizes += sum(p.stat().st_size for p in (ws.backups / backup_id).rglob("*")
                     if p.is_file())
    newest = max(datetime.strptime(i.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                 for i in ids[:2])
    after = newest + timedelta(days=1)

    listing = assert_ok(ws.run("list"))
    line = [x for x in listing.splitlines() if "incomplete copies" in x]
    assert line == [f"2 incomplete copies, {_human(sizes)}, removed by prune after "
                    f"{after:%Y-%m-%d %H:%M} UTC"], listing
    entries = {e["id"]: e for e in json.loads(assert_ok(ws.run("list", "--json")))}
    assert entries[ids[0]]["removed_after"] is not None
    assert entries[ids[2]]["removed_after"] is None
    status = ws.run("status")
    assert line[0] in status.stdout, status.stdout
    found = json.loads(ws.run("status", "--json").stdout)["incomplete_copies"]
    assert found == {"copies": 2, "bytes": sizes,
                     "removed_after": after.isoformat().replace("+00:00", "Z")}


def _human(n: int) -> str:
    from conexa_backup.render import human_bytes
    return human_bytes(n)
