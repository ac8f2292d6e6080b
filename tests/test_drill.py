"""Restore drills (``verify --drill``), driven through the real CLI against real things.

Drills that must pass (the Conexa-like sample, Chinook, the Pagila schema; a copy on each of
local, S3 and GCS; every copy in one run) and drills that must fail, each for its own reason,
with the step that failed named in the JSON report and marked in the JUnit file while the
steps that do not depend on it still pass. After every test no throwaway database
(``conexa_drill_*``) and nothing under ``state_dir/drills`` or ``state_dir/staging`` is left,
also when a drill is stopped by SIGTERM.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import zstandard
from psycopg import sql

from conexa_backup.actions import drill as drill_action
from conexa_backup.actions.context import Context
from conexa_backup.config import load_config
from conexa_backup.crypto import fingerprint
from conexa_backup.state import checks, verified
from conexa_backup.testing.cluster import Cluster, find_bindir
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.conftest import Workspace, fresh_db
from tests.test_copies import cloud_targets
from tests.test_roundtrip import DATASETS

DRILL_DB_PREFIX = "conexa_drill_"
CHECK = "SELECT count(*) > 0 FROM students"
DB_STEPS = ["fetch database", "restore database", "row counts", "schema objects"]
UPLOADS_STEPS = ["fetch and extract uploads", "uploads files"]
RTO_STEP = "recovery time"
_reports = itertools.count()


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, pass or fail: no throwaway database, no drill or staging folder."""
    if "ws" not in request.fixturenames:
        yield
        return
    ws: Workspace = request.getfixturevalue("ws")  # set up now: torn down after this check
    yield
    left = sorted(n for n in ws.cluster.databases() if n.startswith(DRILL_DB_PREFIX))
    for name in left:  # do not let one leak fail every later test too
        ws.cluster.drop_database(name)
    assert not left, f"throwaway databases left: {left}"
    for folder in ("drills", "staging"):
        path = ws.state / folder
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        assert not found, f"left in state_dir/{folder}: {found}"


@pytest.fixture(scope="session")
def drill_chinook(cluster: Cluster) -> str:
    """Chinook (its script drops and creates database ``chinook`` itself: reloading is safe)."""
    path = DATASETS / "chinook" / "Chinook_PostgreSql.sql"
    if not path.exists():
        pytest.skip(f"dataset not found: {path}")
    if "chinook" not in cluster.databases():
        cluster.load_sql_file(path)
    return "chinook"


@pytest.fixture(scope="session")
def drill_pagila(cluster: Cluster) -> str:
    """The Pagila schema, in a database of our own (test_roundtrip creates ``pagila``)."""
    path = DATASETS / "pagila" / "pagila-schema.sql"
    if not path.exists():
        pytest.skip(f"dataset not found: {path}")
    name = "drill_pagila"
    if name not in cluster.databases():
        cluster.create_database(name)
        cluster.load_sql_file(path, name)
    return name


@pytest.fixture
def ws3(ws: Workspace, s3_server: S3Server, gcs_server: GCSServer) -> Workspace:
    """Local + S3 + GCS targets, with the Conexa check query."""
    ws.write_config(cloud_targets(s3_server.endpoint) + _drill_toml([CHECK]))
    return ws


# -- helpers ------------------------------------------------------------------------------------

def _drill_toml(checks: Sequence[str] = (), **settings: str) -> str:
    lines = ["[drill]", f"checks = [{', '.join(json.dumps(q) for q in checks)}]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def _backup(ws: Workspace) -> str:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    backup_id: str = json.loads(result.stdout)["id"]
    return backup_id


def _steps(checks: Sequence[str] = ()) -> list[str]:
    return [*DB_STEPS, *(f"check: {q}" for q in checks), *UPLOADS_STEPS, RTO_STEP]


def _failed_steps(checks: Sequence[str] = ()) -> list[str]:
    """The steps of a drill that failed before its end: the recovery time is not judged."""
    return _steps(checks)[:-1]


@dataclass
class DrillRun:
    proc: subprocess.CompletedProcess[str]
    report: dict[str, Any]
    junit: ET.Element

    @property
    def results(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self.report["drills"]
        return results

    def steps(self, index: int = 0) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in self.results[index]["steps"]}


def _drill(ws: Workspace, *args: str) -> DrillRun:
    """``verify --drill ARGS --json --junit FILE``; the report and the parsed JUnit XML."""
    junit = ws.root / f"junit-{next(_reports)}.xml"
    proc = ws.run("verify", "--drill", *args, "--json", "--junit", str(junit))
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    return DrillRun(proc, report, ET.parse(junit).getroot())  # noqa: S314 (ours)


def _suite(run: DrillRun, target: str) -> ET.Element:
    suites = [s for s in run.junit.iter("testsuite") if s.get("name", "").endswith(f" {target}")]
    assert len(suites) == 1, ET.tostring(run.junit, "unicode")
    return suites[0]


def _assert_recorded(ws: Workspace, backup_id: str, target: str, ok: bool,
                     result: dict[str, Any], *, listed: bool = True,
                     damaged: bool = False) -> None:
    """drills.json (and ``list``, when ``listed``) say what the drill found; ``damaged``:
    the drill failed for a cause that proves the copy bad (catalog.proves_damage)."""
    history = json.loads((ws.state / "drills.json").read_text())["drills"]
    mine = [d for d in history if d["backup_id"] == backup_id and d["target"] == target]
    assert mine and mine[-1]["ok"] is ok
    assert mine[-1]["started_at"] == result["started_at"]
    assert [s["name"] for s in mine[-1]["steps"]] == [s["name"] for s in result["steps"]]
    if ok:  # a passing drill counts as a verification (it protects the backup from pruning)
        assert target in verified(ws.state).get(backup_id, {})
    else:  # a failed one proves nothing
        assert target not in verified(ws.state).get(backup_id, {})
    # A copy found bad is damaged until a verify or drill passes; one that failed for another
    # cause (a role missing here, a check query, only slower than the RTO) is not.
    failed = [s["name"] for s in result["steps"] if not s["ok"]]
    assert [s["name"] for s in result["steps"] if s["damage"]] == (failed if damaged else [])
    damage = checks(ws.state).damage(backup_id, target)
    assert (damage is not None) == damaged, damage
    if damage is not None:
        assert damage.why.startswith(f"drill: {failed[0]}: "), damage
    if not listed:
        return
    listing = json.loads(ws.run("list", "--json").stdout)
    entry = next(b for b in listing if b["id"] == backup_id)
    assert entry["drills"][target]["ok"] is ok
    assert entry["drills"][target]["at"] == result["started_at"]
    assert (target in entry["damaged_targets"]) == damaged, entry
    if damaged:
        assert entry["status"] == "damaged" and target not in entry["targets"]
        assert entry["damaged_targets"][target]["why"].startswith(f"drill: {failed[0]}: ")
        assert entry["damaged_targets"][target]["at"] >= result["started_at"][:19]
    assert entry["drills"][target]["recovery_seconds"] == result["recovery_seconds"]


def _assert_status_last_drill(ws: Workspace, backup_id: str, target: str, ok: bool) -> None:
    status = ws.run("status", "--json")
    # Its exit code speaks Nagios (0 OK, 1 WARNING, 2 CRITICAL), 3 is UNKNOWN (unreadable).
    assert status.returncode in (0, 1, 2), status.stdout + status.stderr
    last = json.loads(status.stdout)["last_drill"]
    assert (last["backup_id"], last["target"], last["ok"]) == (backup_id, target, ok)
    assert last["recovery_seconds"] >= 0


def _assert_passed(ws: Workspace, run: DrillRun, backup_id: str,
                   targets: Sequence[str], steps: Sequence[str]) -> None:
    assert run.proc.returncode == 0, run.proc.stdout + run.proc.stderr
    assert run.report["ok"] is True
    assert [(r["backup_id"], r["target"]) for r in run.results] == \
        [(backup_id, t) for t in targets]
    assert run.junit.tag == "testsuites"
    assert len(list(run.junit.iter("testsuite"))) == len(targets)
    for index, (target, result) in enumerate(zip(targets, run.results, strict=True)):
        assert result["ok"] is True
        assert list(run.steps(index)) == list(steps)
        assert all(s["ok"] for s in result["steps"]), result["steps"]
        assert 0 < result["recovery_seconds"] < result["rto_objective_seconds"]
        suite = _suite(run, target)
        cases = suite.findall("testcase")
        assert [c.get("name") for c in cases] == list(steps)
        assert suite.get("tests") == str(len(steps)) and suite.get("failures") == "0"
        assert not list(suite.iter("failure"))
        _assert_recorded(ws, backup_id, target, True, result)
    if "local" in targets:  # the result is also kept beside the drilled copy
        beside = json.loads((ws.backups / backup_id / "drill.json").read_text())
        local = next(r for r in run.results if r["target"] == "local")
        assert beside["ok"] is True and beside["started_at"] == local["started_at"]
    _assert_status_last_drill(ws, backup_id, targets[-1], True)


def _assert_failed_at(ws: Workspace, run: DrillRun, backup_id: str, failed: str,
                      steps: Sequence[str], detail: Sequence[str], *,
                      full: bool = False, damaged: bool = True) -> str:
    """Exit 1; ``failed`` is the one failing step (its detail holding each of ``detail``);
    every other step in ``steps`` ran and passed; JUnit marks exactly that failure; the
    result is recorded (with ``full``, also as ``list`` and ``status`` show it), the copy
    as damaged when ``damaged``."""
    target = "local"
    assert run.proc.returncode == 1, run.proc.stdout + run.proc.stderr
    assert run.report["ok"] is False and len(run.results) == 1
    result = run.results[0]
    assert result["ok"] is False and result["target"] == target
    by_name = run.steps()
    assert list(by_name) == list(steps)
    # A failed drill recovered nothing to time: no "recovery time" row, unless that failed.
    assert (RTO_STEP in by_name) == (failed == RTO_STEP), list(by_name)
    assert [n for n, s in by_name.items() if not s["ok"]] == [failed], result["steps"]
    message = by_name[failed]["detail"]
    for fragment in detail:
        assert fragment in message, message
    suite = _suite(run, target)
    assert suite.get("failures") == "1" and suite.get("tests") == str(len(steps))
    failing = [c for c in suite.findall("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failing] == [failed]
    failure = failing[0].find("failure")
    assert failure is not None and failure.get("message") == message.splitlines()[0]
    assert failure.text == message  # the whole message (pg_restore context and all)
    _assert_recorded(ws, backup_id, target, False, result, listed=full, damaged=damaged)
    if full:
        _assert_status_last_drill(ws, backup_id, target, False)
    beside = json.loads((ws.backups / backup_id / "drill.json").read_text())
    assert beside["ok"] is False and beside["started_at"] == result["started_at"]
    return message


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _manifest_path(ws: Workspace, backup_id: str) -> Path:
    return ws.backups / backup_id / "manifest.json"


def _cache_manifest(ws: Workspace, backup_id: str) -> None:
    """Run ``list``: the manifest, as committed, is then in the manifest cache."""
    assert ws.run("list").returncode == 0
    assert (ws.state / "cache" / "manifests" / "local" / f"{backup_id}.entry.json").is_file()


def _rewrite_manifest(ws: Workspace, backup_id: str, edit: Any) -> None:
    """Edit the local copy's manifest (the unsigned commit marker) and drop the manifest
    cache, so that the next run reads the edited file."""
    path = _manifest_path(ws, backup_id)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
    shutil.rmtree(ws.state / "cache", ignore_errors=True)


def _bin_dir(ws: Workspace, pg_restore_script: str) -> Path:
    """A ``[database] bin_dir``: the real client tools, but ``pg_restore`` is our script
    (``$REAL`` in it is the real pg_restore)."""
    real = find_bindir()
    folder = ws.root / "bin"
    folder.mkdir()
    for tool in real.iterdir():
        if tool.name != "pg_restore":
            (folder / tool.name).symlink_to(tool)
    script = folder / "pg_restore"
    script.write_text(f"#!/bin/sh\nREAL={real / 'pg_restore'}\n{pg_restore_script}\n")
    script.chmod(0o755)
    return folder


def _use_bin_dir(ws: Workspace, folder: Path) -> None:
    text = ws.config.read_text()
    ws.config.write_text(text.replace("[database]\n", f'[database]\nbin_dir = "{folder}"\n', 1))


# -- drills that pass ---------------------------------------------------------------------------

def test_conexa_sample_drill_passes_and_is_recorded_everywhere(ws: Workspace) -> None:
    ws.write_config(_drill_toml([CHECK]))
    backup_id = _backup(ws)
    run = _drill(ws)
    _assert_passed(ws, run, backup_id, ["local"], _steps([CHECK]))
    steps = run.steps()
    assert "12 tables" in steps["row counts"]["detail"]
    assert steps[f"check: {CHECK}"]["detail"] == "true"
    links = sum(1 for p in ws.uploads.rglob("*") if p.is_symlink())
    assert steps["uploads files"]["detail"] == \
        f"SHA-256 of every file matches; {links} symlinks with their targets"
    assert "60 files" in steps["fetch and extract uploads"]["detail"]
    # The human table says the same, and a second drill by id is recorded after the first.
    human = ws.run("verify", "--drill", backup_id)
    assert human.returncode == 0, human.stderr
    assert "PASSED" in human.stdout and f"check: {CHECK}" in human.stdout
    assert len(json.loads((ws.state / "drills.json").read_text())["drills"]) == 2


@pytest.mark.parametrize("dataset", ["drill_chinook", "drill_pagila"])
def test_public_dataset_drill_passes(ws: Workspace, dataset: str,
                                     request: pytest.FixtureRequest) -> None:
    template = request.getfixturevalue(dataset)
    source = fresh_db(ws.cluster, template, prefix=ws.dbname)
    ws.write_config(database=source)
    backup_id = _backup(ws)
    run = _drill(ws)
    _assert_passed(ws, run, backup_id, ["local"], _steps())
    objects = json.loads(_manifest_path(ws, backup_id).read_text())["database"]["objects"]
    assert objects["tables"]
    detail = run.steps()["schema objects"]["detail"]
    assert detail == ", ".join(f"{len(names)} {kind}" for kind, names in objects.items())


def test_drill_from_each_target_type_then_all_targets(ws3: Workspace) -> None:
    backup_id = _backup(ws3)
    for target in ("local", "s3", "gcs"):  # one run per copy, named with --from
        run = _drill(ws3, "--from", target)
        _assert_passed(ws3, run, backup_id, [target], _steps([CHECK]))
    run = _drill(ws3, "--all-targets")  # every copy in one run
    _assert_passed(ws3, run, backup_id, ["local", "s3", "gcs"], _steps([CHECK]))
    assert len({r["started_at"] for r in run.results}) == 3
    listing = json.loads(ws3.run("list", "--json").stdout)
    assert {t: d["ok"] for t, d in listing[0]["drills"].items()} == \
        {"local": True, "s3": True, "gcs": True}
    # drill.json was stored beside each copy, on the cloud targets too (read back through
    # the tool's own storage layer).
    by_target = {r["target"]: r for r in run.results}
    for target in Context(load_config(ws3.config)[0]).targets():
        with target.open(f"{backup_id}/drill.json") as fh:
            stored = json.loads(fh.read())
        assert stored["ok"] is True
        assert stored["started_at"] == by_target[target.name]["started_at"]

    # One copy goes bad: the others are still drilled, and the run fails (exit 1).
    _flip_middle_byte(ws3.backups / backup_id / "database.dump.zst")
    run = _drill(ws3, "--all-targets")
    assert run.proc.returncode == 1 and run.report["ok"] is False
    assert {r["target"]: r["ok"] for r in run.results} == {"local": False, "s3": True, "gcs": True}
    assert [n for n, s in run.steps(0).items() if not s["ok"]] == ["fetch database"]
    assert {s.get("name"): s.get("failures") for s in run.junit.iter("testsuite")} == {
        f"drill {backup_id} local": "1", f"drill {backup_id} s3": "0",
        f"drill {backup_id} gcs": "0"}
    listing = json.loads(ws3.run("list", "--json").stdout)
    assert {t: d["ok"] for t, d in listing[0]["drills"].items()} == \
        {"local": False, "s3": True, "gcs": True}


def test_drill_usage_errors(ws: Workspace) -> None:
    both = ws.run("verify", "--drill", "--from", "local", "--all-targets")
    assert both.returncode == 2 and "exclude each other" in both.stderr
    assert ws.run("verify", "--junit", str(ws.root / "j.xml")).returncode == 2
    unknown = ws.run("verify", "--drill", "--from", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    nothing = ws.run("verify", "--drill")
    assert nothing.returncode == 2 and "no complete backup" in nothing.stderr
    assert not (ws.root / "j.xml").exists()


def test_verify_drill_json_that_fails_early_prints_a_json_error(ws: Workspace) -> None:
    """Exit 2 before any drill: the error is on stderr, and ``--json`` still gets one JSON
    document on stdout (before: nothing, and a JSON reader failed on an empty answer)."""
    for args, said in ((["verify", "--drill", "--json"], "no complete backup"),
                       (["verify", "--drill", "--from", "nope", "--json"], "nope"),
                       (["verify", "--json"], "no complete backup")):
        result = ws.run(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        answer = json.loads(result.stdout)
        assert answer == {"ok": False, "error": answer["error"], "exit_code": 2}, answer
        assert said in answer["error"] and said in result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_a_failed_drill_shows_no_recovery_time(ws: Workspace) -> None:
    """Before: a drill that failed at its first step still had a "recovery time ... ok" row
    (the failure was quick), and the table ended with "recovery time 0.2 s"."""
    backup_id = _backup(ws)
    _flip_middle_byte(ws.backups / backup_id / "database.dump.zst")
    run = _drill(ws)
    assert RTO_STEP not in run.steps()
    assert RTO_STEP not in [c.get("name") for c in run.junit.iter("testcase")]
    human = ws.run("verify", "--drill", backup_id)
    assert human.returncode == 1, human.stdout + human.stderr
    assert "FAILED" in human.stdout
    assert not re.search(r"(?m)^recovery time\s+ok", human.stdout), human.stdout
    assert "recovery time not measured: the drill failed" in human.stdout
    assert not re.search(r"recovery time [0-9]", human.stdout), human.stdout


def test_a_drill_without_a_fitting_identity_could_not_run(ws: Workspace, tmp_path: Path) -> None:
    """An encrypted backup on a host with no age identity (then with one that is not a
    recipient): "could not drill", exit 2, recorded as not run; never a failed drill, a
    damaged copy, a verified one, or a failure in list, status or the report."""
    from tests.test_trust import encryption_toml, make_age_key, toml_str
    key = make_age_key(tmp_path / "keys" / "age-identity.txt")
    other = make_age_key(tmp_path / "keys" / "other.txt")
    ws.write_config(encryption_toml(key, identity=False))
    backup_id = _backup(ws)
    wanted = fingerprint(key.recipient)
    configs = [encryption_toml(key, identity=False),
               encryption_toml(key, identity=False) + f"identity_file = {toml_str(other.file)}\n"]
    for n, config in enumerate(configs, start=1):
        ws.write_config(config)
        junit = ws.root / f"not-run-{n}.xml"
        proc = ws.run("verify", "--drill", backup_id, "--json", "--junit", str(junit))
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "could not drill" in proc.stderr and wanted in proc.stderr
        report = json.loads(proc.stdout)
        (result,) = report["drills"]
        assert report["ok"] is False and result["ok"] is False
        assert result["outcome"] == "not_run" and result["steps"] == []
        assert wanted in result["not_run"]
        if n == 2:
            assert fingerprint(other.recipient) in result["not_run"]
        else:
            assert "identity_file" in result["not_run"]
        suite = _suite(DrillRun(proc, report, ET.parse(junit).getroot()), "local")  # noqa: S314
        assert (suite.get("failures"), suite.get("skipped")) == ("0", "1")

        recorded = json.loads((ws.state / "drills.json").read_text())["drills"]
        assert [d["outcome"] for d in recorded] == ["not_run"] * (2 * n - 1)  # human runs too
        assert checks(ws.state).damage(backup_id, "local") is None
        assert backup_id not in verified(ws.state)
        assert not (ws.backups / backup_id / "drill.json").exists()
        human = ws.run("verify", "--drill", backup_id)
        assert human.returncode == 2 and "COULD NOT DRILL" in human.stdout
        assert "FAILED" not in human.stdout and "recovery time" not in human.stdout

    listing = json.loads(ws.run("list", "--json").stdout)
    assert listing[0]["status"] == "complete" and listing[0]["targets"] == ["local"]
    assert listing[0]["drills"] == {}  # nothing proven, nothing failed
    status = ws.run("status", "--json")
    problems = json.loads(status.stdout)["targets"][0]["problems"]
    assert any(p.startswith(f"could not drill {backup_id}") for p in problems), problems
    assert not any("drill" in p and "failed" in p for p in problems), problems
    assert json.loads(status.stdout)["last_drill"] is None
    drills = json.loads(ws.run("report", "--json").stdout)["drills"]
    assert (drills["runs"], drills["failed"], drills["not_run"]) == (0, 0, 4)


# -- drills that must fail ----------------------------------------------------------------------

AFTER_FETCH_FAILED = ["fetch database", *UPLOADS_STEPS]  # no recovery time: nothing recovered


def test_corrupted_dump_fails_at_fetch(ws: Workspace) -> None:
    backup_id = _backup(ws)
    _flip_middle_byte(ws.backups / backup_id / "database.dump.zst")
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "fetch database", AFTER_FETCH_FAILED,
                      ["database.dump.zst", "target 'local'"], full=True)


def test_truncated_dump_fails_at_fetch(ws: Workspace) -> None:
    backup_id = _backup(ws)
    dump = ws.backups / backup_id / "database.dump.zst"
    with dump.open("r+b") as fh:
        fh.truncate(dump.stat().st_size // 2)
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "fetch database", AFTER_FETCH_FAILED,
                      ["database.dump.zst"])


def _bump_students(ws: Workspace, backup_id: str) -> tuple[int, int]:
    manifest = json.loads(_manifest_path(ws, backup_id).read_text())
    count = int(manifest["database"]["tables"]["public.students"])
    return count, int(f"1{count}")  # one digit longer: larger, and a different length


def test_row_count_disagreeing_with_the_manifest_fails(ws: Workspace) -> None:
    backup_id = _backup(ws)
    _cache_manifest(ws, backup_id)
    count, wrong = _bump_students(ws, backup_id)
    path = _manifest_path(ws, backup_id)
    before = path.stat().st_size
    text = path.read_text()
    assert text.count(f'"public.students": {count}') == 1
    path.write_text(text.replace(f'"public.students": {count}', f'"public.students": {wrong}'))
    assert path.stat().st_size != before  # a changed manifest: the cache must not be used
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "row counts", _failed_steps(),
                      ["public.students", f"{count} rows, expected {wrong}"])


def test_same_length_manifest_edit_is_not_hidden_by_the_cache(ws: Workspace) -> None:
    backup_id = _backup(ws)
    _cache_manifest(ws, backup_id)
    path = _manifest_path(ws, backup_id)
    text = path.read_text()
    found = re.search(r'"public\.students": (\d+)', text)
    assert found is not None
    count = found.group(1)
    wrong = count[:-1] + str((int(count[-1]) + 1) % 10)  # same length, another value
    path.write_text(text.replace(found.group(0), f'"public.students": {wrong}'))
    assert len(path.read_bytes()) == len(text.encode())
    run = _drill(ws)
    assert run.proc.returncode == 1
    assert not run.steps()["row counts"]["ok"]
    assert "public.students" in run.steps()["row counts"]["detail"]


@pytest.mark.parametrize(("query", "expected"), [
    ("SELECT count(*) = 0 FROM students", ["check returned [(False,)]", "expected one true"]),
    ("SELEC count(*) FROM students", ["syntax error", "SELEC"]),
    ("SELECT count(*) > 0 FROM no_such_table", ["no_such_table", "does not exist"]),
], ids=["false", "syntax-error", "unknown-table"])
def test_failing_check_query_fails_that_check_only(ws: Workspace, query: str,
                                                    expected: list[str]) -> None:
    ws.write_config(_drill_toml([CHECK, query]))
    backup_id = _backup(ws)
    run = _drill(ws)
    # The dump restored as stored: a check the data fails says nothing about the copy.
    _assert_failed_at(ws, run, backup_id, f"check: {query}", _failed_steps([CHECK, query]),
                      expected,
                      damaged=False)


@pytest.mark.parametrize(("ghost", "shown"), [
    ("2026/11/ghost-of-a-report.pdf", "2026/11/ghost-of-a-report.pdf"),
    (os.fsdecode(b"2026/11/caf\xe9.pdf"), "2026/11/caf\\xe9.pdf"),  # a Latin-1 name
], ids=["utf8", "latin1"])
def test_file_missing_from_the_restored_uploads_fails(ws: Workspace, ghost: str,
                                                      shown: str) -> None:
    """The index says a file was backed up that the archive does not hold: the manifest (the
    unsigned commit marker) is rewritten to point at an index with one more entry. A name
    that is not UTF-8 is shown escaped (before: the JSON output failed on it)."""
    backup_id = _backup(ws)
    index = ws.backups / backup_id / "uploads.index.jsonl.zst"
    lines = zstandard.ZstdDecompressor().stream_reader(index.read_bytes()).read()
    assert lines.count(b'"type": "file"') == 60
    entry = {"path": ghost, "size": 3, "sha256": hashlib.sha256(b"pdf").hexdigest()}
    data = zstandard.ZstdCompressor().compress(lines + json.dumps(entry).encode() + b"\n")
    _replace_index(ws, backup_id, data)
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "uploads files", _failed_steps(),
                      [f"missing {shown}"])


def _replace_index(ws: Workspace, backup_id: str, data: bytes) -> None:
    """Store ``data`` as the backup's uploads index, and the manifest to match (so only the
    index's content, not its checksum, is wrong)."""
    (ws.backups / backup_id / "uploads.index.jsonl.zst").write_bytes(data)

    def point_at_new_index(manifest: dict[str, Any]) -> None:
        artifact = next(a for a in manifest["artifacts"] if a["kind"] == "uploads-index")
        artifact.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    _rewrite_manifest(ws, backup_id, point_at_new_index)


def _links_leaving_the_tree(uploads: Path) -> dict[str, str]:
    """Symlinks a real uploads folder may hold: absolute, out of the tree, dangling."""
    links = {"etc-hostname": "/etc/hostname", "nowhere": "../nowhere",
             "dangling": "/nonexistent/file.pdf", "parent": "../"}
    for name, target in links.items():
        (uploads / name).symlink_to(target)
    return links


def test_links_leaving_the_tree_drill_and_compare_with_the_index(ws: Workspace) -> None:
    """Before: "refusing archive member ... is a link to an absolute path" (drill failed)."""
    links = _links_leaving_the_tree(ws.uploads)
    backup_id = _backup(ws)
    run = _drill(ws)
    _assert_passed(ws, run, backup_id, ["local"], _steps())
    total = sum(1 for p in ws.uploads.rglob("*") if p.is_symlink())
    assert total > len(links)
    assert f"{total} symlinks" in run.steps()["fetch and extract uploads"]["detail"]
    assert f"{total} symlinks with their targets" in run.steps()["uploads files"]["detail"]


def test_symlink_target_differing_from_the_index_fails(ws: Workspace) -> None:
    """The index recorded another target than the archive holds: the drill says which."""
    _links_leaving_the_tree(ws.uploads)
    backup_id = _backup(ws)
    index = ws.backups / backup_id / "uploads.index.jsonl.zst"
    lines = zstandard.ZstdDecompressor().stream_reader(index.read_bytes()).read()
    edited = lines.replace(b'"target": "../nowhere"', b'"target": "../somewhere"')
    assert edited != lines
    data = zstandard.ZstdCompressor().compress(edited)
    _replace_index(ws, backup_id, data)
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "uploads files", _failed_steps(),
                      ["symlink nowhere points to '../nowhere', index says '../somewhere'"])


def test_pg_restore_error_fails_the_restore_with_its_stderr(ws: Workspace) -> None:
    backup_id = _backup(ws)
    # The real pg_restore runs (and "succeeds"), then the tool reports an error.
    _use_bin_dir(ws, _bin_dir(ws, '"$REAL" "$@" || exit $?\n'
                                  'echo "pg_restore: error: simulated restore error" >&2\n'
                                  'echo "Command was: SELECT 1;" >&2\nexit 1'))
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "restore database",
                      ["fetch database", "restore database", *UPLOADS_STEPS],
                      ["pg_restore failed (exit 1)", "simulated restore error"],
                      damaged=False)


def _backup_with_a_lost_owner(ws: Workspace) -> tuple[str, str]:
    """Back up a database whose table is owned by a role that is then dropped: restoring
    it must fail (ALTER TABLE ... OWNER TO a role that does not exist)."""
    role = f"{ws.dbname}_ghost"
    source = fresh_db(ws.cluster, prefix=ws.dbname)
    ws.cluster.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    ws.cluster.execute(sql.SQL("ALTER TABLE students OWNER TO {}").format(
        sql.Identifier(role)), source)
    ws.write_config(_drill_toml([CHECK]), database=source)
    backup_id = _backup(ws)
    ws.cluster.drop_database(source)
    ws.cluster.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    return backup_id, role


def test_real_restore_error_fails_the_restore_and_says_why(ws: Workspace) -> None:
    """The stored dump is intact (its SHA-256 checked): a role missing on this server is not
    the copy's fault, so the copy is not marked damaged. Before: any failed step marked it."""
    backup_id, role = _backup_with_a_lost_owner(ws)
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, "restore database",
                      ["fetch database", "restore database", *UPLOADS_STEPS],
                      ["pg_restore failed (exit 1)", f'role "{role}" does not exist'],
                      full=True, damaged=False)


# -- the recovery time objective ----------------------------------------------------------------

def test_check_rto_passes_within_and_fails_beyond_the_objective() -> None:
    assert drill_action._check_rto(59.94, 60) == "59.9 s (objective 60 s)"
    assert drill_action._check_rto(60.0, 60).startswith("60.0 s")
    with pytest.raises(drill_action.CheckFailed, match=r"recovery took 61\.0 s .*RTO exceeded"):
        drill_action._check_rto(61.0, 60)


def test_exceeded_rto_fails_the_recovery_time_step(ws: Workspace,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole drill, in-process, with a clock in which every reading is 61 s later: the
    real fetch, restore and checks pass, and only "recovery time" fails (objective 1 min)."""
    ws.write_config(_drill_toml([CHECK], rto_objective="1m"))
    backup_id = _backup(ws)
    ticks = itertools.count()
    monkeypatch.setattr(drill_action, "time",
                        SimpleNamespace(monotonic=lambda: 61.0 * next(ticks)))
    junit = ws.root / "rto.xml"
    result: Any = ws.cli("verify", "--drill", "--json", "--junit", str(junit))
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    run = DrillRun(subprocess.CompletedProcess([], 1, result.stdout, ""), report,
                   ET.parse(junit).getroot())  # noqa: S314 (ours)
    _assert_failed_at(ws, run, backup_id, RTO_STEP, _steps([CHECK]),
                      ["RTO exceeded", "(objective 60 s)"], damaged=False)
    assert run.results[0]["recovery_seconds"] > 60
    assert run.results[0]["rto_objective_seconds"] == 60


def test_rto_objective_in_seconds_end_to_end(ws: Workspace) -> None:
    backup_id = _backup(ws)
    ws.write_config(_drill_toml(rto_objective="1s"))
    _use_bin_dir(ws, _bin_dir(ws, 'sleep 2\nexec "$REAL" "$@"'))
    run = _drill(ws)
    _assert_failed_at(ws, run, backup_id, RTO_STEP, _steps(), ["RTO exceeded"], damaged=False)


# -- interrupted ----------------------------------------------------------------------------------

def test_sigterm_during_the_restore_removes_everything(ws: Workspace) -> None:
    backup_id = _backup(ws)
    _use_bin_dir(ws, _bin_dir(ws, "exec sleep 30"))  # pg_restore hangs
    proc = subprocess.Popen(
        [sys.executable, "-m", "conexa_backup", "--config", str(ws.config), "verify", "--drill"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=dict(os.environ))
    try:
        deadline = time.monotonic() + 30
        while not any(n.startswith(DRILL_DB_PREFIX) for n in ws.cluster.databases()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the drill never created its database"
            time.sleep(0.05)
        assert any((ws.state / "staging").iterdir())  # the fetched dump, being restored
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports it
    assert "interrupted by SIGTERM" in stderr
    # Nothing claims this backup was proven (the autouse fixture checks nothing is left).
    assert not (ws.state / "drills.json").exists()
    assert backup_id not in verified(ws.state)
