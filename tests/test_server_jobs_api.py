"""Trigger, restore and jobs over real HTTP: the real server, the CLI as its jobs' child
processes, the real PostgreSQL cluster, the real flock. Also the restore estimate's rule."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from psycopg import sql

from conexa_backup.actions.estimate import (
    NO_DRILL,
    Estimate,
    human_duration,
    restore_estimate,
    restore_size,
)
from conexa_backup.errors import UsageError
from conexa_backup.manifest import ID_PATTERN, Manifest
from conexa_backup.server.jobs import RESTARTED, command
from conexa_backup.testing.compare import table_row_counts
from tests.apikit import ADMIN_SUB, Api, server_section, start_api, stop_jobs
from tests.conftest import Workspace
from tests.test_failures import (
    _q,
    assert_error,
    complete_ids,
    configure,
    listed,
    make_bin_dir,
    temp_files,
    wait_for,
)
from tests.test_server_jobs import group_gone, holder  # noqa: F401 (a fixture)

TRIGGER = "/api/admin/backups/trigger"
JOBS = "/api/admin/jobs"
PASSWORD = "s3cret-Pw-0xC0FFEE"  # in the database URL; trust auth ignores it


def restore_path(backup_id: str) -> str:
    return f"/api/admin/backups/{backup_id}/restore"


# -- the estimate's rule (no server) ---------------------------------------------------


def drill(backup_id: str, seconds: float, size: int | None, ok: bool = True) -> dict[str, Any]:
    found: dict[str, Any] = {"backup_id": backup_id, "target": "local", "ok": ok,
                             "recovery_seconds": seconds}
    if size is not None:
        found["size_bytes"] = size
    return found


def test_estimate_is_null_with_the_reason_without_a_passing_drill() -> None:
    for drills in ([], [drill("20260101T000000Z", 10, 1000, ok=False)],
                   [drill("20260101T000000Z", 10, None)]):  # size unknown and not in catalog
        found = restore_estimate(drills, 5000)
        assert (found.seconds, found.text, found.reason) == (None, None, NO_DRILL)


def test_estimate_scales_the_newest_passing_drills_by_size() -> None:
    drills = [drill("20260101T000000Z", 1000, 1),  # older than the newest three: not used
              drill("20260102T000000Z", 10, 1_000_000),
              drill("20260103T000000Z", 30, 3_000_000, ok=False),  # failed: not used
              drill("20260104T000000Z", 20, None),  # size from the catalog
              drill("20260105T000000Z", 30, 3_000_000)]
    found = restore_estimate(drills, 60_000_000, {"20260104T000000Z": 2_000_000})
    assert found.bytes_per_second == 100_000.0  # 6 MB in 60 s
    assert found.seconds == 600 and found.text == "10 minutos"
    assert found.drills == ["20260105T000000Z on local", "20260104T000000Z on local",
                            "20260102T000000Z on local"]
    assert restore_estimate(drills[-1:], 1).seconds == 1  # never "0 s"


@pytest.mark.parametrize(("seconds", "text"), [
    (1, "menos de 1 minuto"), (59, "menos de 1 minuto"), (60, "1 minuto"),
    (61, "2 minutos"), (900, "15 minutos"), (3600, "1 hora"), (3660, "1 hora e 1 minuto"),
    (7500, "2 horas e 5 minutos")])
def test_estimate_in_words(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text
    assert Estimate(1, seconds).text == text


def test_restore_size_counts_the_parts_restored(ws: Workspace) -> None:
    backup_id = json.loads(ws.run("backup", "--json").stdout)["id"]
    manifest = Manifest.from_json((ws.backups / backup_id / "manifest.json").read_bytes(), "")
    kinds = {a.kind: a.size for a in manifest.artifacts}
    assert restore_size(manifest) == manifest.size_bytes
    assert restore_size(manifest, "database") == kinds["database"] + kinds.get("globals", 0)
    assert restore_size(manifest, "uploads") == kinds["uploads"] + kinds["uploads-index"]


def test_backup_under_an_id_chosen_ahead(ws: Workspace) -> None:
    """The API picks a backup's id before its job starts (``backup --id``, hidden)."""
    assert command("backup", {"backup_id": "20260101T000000Z-2"})[-1] == "--id=20260101T000000Z-2"
    assert "--id" not in " ".join(command("backup", {}))
    with pytest.raises(UsageError):
        command("backup", {"backup_id": "--no-prune"})
    made = ws.run("backup", "--id", "20260101T000000Z-2", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["id"] == "20260101T000000Z-2"
    assert_error(ws.run("backup", "--id", "20260101T000000Z-2"), 2, "already taken")
    assert_error(ws.run("backup", "--id", "latest"), 2, "not a backup id")
    assert complete_ids(ws) == ["20260101T000000Z-2"]


# -- servers over special configs ------------------------------------------------------


@pytest.fixture
def serve(ws: Workspace) -> Iterator[Callable[..., Api]]:
    """Start ``serve`` over ``ws`` as :func:`configure` writes it (database ``url``,
    ``bin_dir``), or again over the config already written (``again=True``); stopped, jobs
    killed, at the end."""
    started: list[Api] = []

    def start(again: bool = False, url: str | None = None,
              bin_dir: Path | None = None) -> Api:
        if not again:
            database: dict[str, object] = {"bin_dir": bin_dir} if bin_dir else {}
            configure(ws, url=url, **database)  # type: ignore[arg-type]
            with ws.config.open("a", encoding="utf-8") as out:
                out.write(server_section("127.0.0.1:8765"))  # serve --listen overrides it
            ws.config.chmod(0o600)
        started.append(start_api(ws, write_config=False))
        return started[-1]

    yield start
    for api in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            api.stop()
        if api.proc.poll() is None:
            api.kill()
    stop_jobs(ws.state)


def held_bin(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A ``bin_dir`` whose pg_dump says it started (``waiting``) and then waits for
    ``release`` to exist before running the real one: a backup job held mid-run."""
    waiting, release = tmp_path / "pg_dump waiting", tmp_path / "release pg_dump"
    body = (f"touch {_q(waiting)}\n"
            f"while [ ! -e {_q(release)} ]; do sleep 0.1; done\n"
            'exec "$REAL" "$@"')
    return make_bin_dir(tmp_path / "held bin", body), waiting, release


def job_pid(ws: Workspace, job_id: str) -> int:
    pid: int = json.loads((ws.state / "jobs" / f"{job_id}.json").read_text())["pid"]
    return pid


def audited(api: Api, action: str) -> list[dict[str, Any]]:
    return [e for e in api.audit() if e["action"] == action]


# -- trigger ---------------------------------------------------------------------------


def test_trigger_answers_the_backup_id_at_once_and_the_job_makes_it(
        ws: Workspace, serve: Callable[..., Api]) -> None:
    user = ws.cluster.user
    url = ws.cluster.url(ws.dbname).replace(f"://{user}@", f"://{user}:{PASSWORD}@")
    assert PASSWORD in url
    api = serve(url=url)
    answer = api.post(TRIGGER)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["success"] is True
    backup_id, job_id = body["backupId"], body["jobId"]
    assert ID_PATTERN.match(backup_id) and body["job"]["id"] == job_id
    stamp = body["timestamp"]  # ISO 8601 UTC, the second the id names
    assert stamp.endswith("Z") and backup_id.startswith(stamp.replace("-", "").replace(":", "")
                                                             .removesuffix("Z"))
    assert body["job"]["state"] == "running" and body["job"]["backup_id"] == backup_id
    job = api.wait_job(job_id)
    assert (job["state"], job["exit_code"], job["error"]) == ("succeeded", 0, None), job
    assert (job["kind"], job["sub"], job["backup_id"]) == ("backup", ADMIN_SUB, backup_id)
    assert job["steps"] and job["result"]["id"] == backup_id
    assert job["created"] <= job["started"] <= job["finished"]
    assert "pid" not in job
    assert complete_ids(ws) == [backup_id]
    jobs = api.get(JOBS).json()["jobs"]
    assert [j["id"] for j in jobs] == [job_id] and jobs[0]["state"] == "succeeded"
    assert PASSWORD not in json.dumps(job) + json.dumps(jobs)
    assert [(e["outcome"], e["backup_id"], e["detail"]) for e in audited(api, "trigger")] \
        == [("ok", backup_id, {"job_id": job_id})]


def test_trigger_and_jobs_need_the_admin_role(api: Api) -> None:
    for method, path in (("POST", TRIGGER), ("GET", JOBS), ("GET", f"{JOBS}/x"),
                         ("POST", f"{JOBS}/x/cancel")):
        assert api.request(method, path, role="viewer").status_code == 403
        assert api.request(method, path, role=None).status_code == 401
    assert api.get(JOBS).json() == {"jobs": []}
    # Refused before the route: nothing started; the changing routes' refusals are audited.
    assert [(e["action"], e["outcome"]) for e in api.audit()] == [
        ("trigger", "refused: forbidden"), ("trigger", "refused: missing_token"),
        ("cancel", "refused: forbidden"), ("cancel", "refused: missing_token")]


def test_two_triggers_at_once_one_is_busy(api: Api, ws: Workspace) -> None:
    barrier = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def trigger() -> None:
        barrier.wait()
        answers.append(api.post(TRIGGER))

    threads = [threading.Thread(target=trigger) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a.status_code for a in answers) == [202, 409]
    started = next(a.json() for a in answers if a.status_code == 202)
    refused = next(a.json() for a in answers if a.status_code == 409)
    assert refused["error"] == "busy"
    assert refused["holder"] == f"job {started['jobId']} (backup)" and refused["since"]
    assert api.wait_job(started["jobId"])["state"] == "succeeded"
    assert complete_ids(ws) == [started["backupId"]]
    assert sorted(e["outcome"] for e in audited(api, "trigger")) == ["ok", "refused: busy"]


def test_trigger_while_a_cli_run_holds_the_lock(
        api: Api, holder: subprocess.Popen[str]) -> None:  # noqa: F811
    answer = api.post(TRIGGER)
    assert answer.status_code == 409
    body = answer.json()
    assert body["error"] == "busy" and body["holder"] == f"pid {holder.pid}, test holder"
    assert body["since"].endswith("Z")
    assert api.get(JOBS).json() == {"jobs": []}
    assert [e["outcome"] for e in audited(api, "trigger")] == ["refused: busy"]


# -- jobs ------------------------------------------------------------------------------


def test_cancel_a_running_backup(ws: Workspace, serve: Callable[..., Api],
                                 tmp_path: Path) -> None:
    bin_dir, waiting, _ = held_bin(tmp_path)
    api = serve(bin_dir=bin_dir)
    body = api.post(TRIGGER).json()
    job_id = body["jobId"]
    wait_for(waiting.exists, 60, "the job's pg_dump to start")
    asked = api.post(f"{JOBS}/{job_id}/cancel")
    assert asked.status_code == 200
    assert (asked.json()["state"], asked.json()["cancel_requested"]) == ("running", True)
    job = api.wait_job(job_id)
    assert (job["state"], job["exit_code"], job["cancel_requested"]) == ("canceled", 143, True)
    pid = job_pid(ws, job_id)
    wait_for(lambda: group_gone(pid), 30, "the job's process group to end")
    assert [e for e in listed(ws) if e["status"] == "complete"] == []
    assert temp_files(ws.backups) == []
    assert api.post(f"{JOBS}/{job_id}/cancel").json()["state"] == "canceled"  # over: as is
    assert [(e["outcome"], e["detail"]["job_id"]) for e in audited(api, "cancel")] \
        == [("ok", job_id), ("ok", job_id)]


@pytest.mark.parametrize("job_id", ["nosuchjob0000000", "..%2f..%2fetc", "x" * 300])
def test_unknown_job_is_404(api: Api, job_id: str) -> None:
    for method, path in (("GET", f"{JOBS}/{job_id}"), ("POST", f"{JOBS}/{job_id}/cancel")):
        answer = api.request(method, path)
        assert answer.status_code == 404 and answer.json()["error"] in ("job_not_found",
                                                                        "not_found")
    assert [e["outcome"] for e in audited(api, "cancel")] in ([], ["refused: job_not_found"])


def test_jobs_list_limit_is_bounded(api: Api) -> None:
    assert api.get(f"{JOBS}?limit=0").status_code == 422
    assert api.get(f"{JOBS}?limit=501").status_code == 422
    assert api.get(f"{JOBS}?limit=500").json() == {"jobs": []}


@pytest.mark.parametrize("how", ["followed", "ended_while_down", "killed"])
def test_server_killed_mid_job_then_restarted(ws: Workspace, serve: Callable[..., Api],
                                              tmp_path: Path, how: str) -> None:
    bin_dir, waiting, release = held_bin(tmp_path)
    api = serve(bin_dir=bin_dir)
    body = api.post(TRIGGER).json()
    job_id, backup_id = body["jobId"], body["backupId"]
    wait_for(waiting.exists, 60, "the job's pg_dump to start")
    api.kill()
    pid = job_pid(ws, job_id)
    assert not group_gone(pid)  # the job runs in its own process group: it survived
    if how == "killed":
        os.killpg(pid, signal.SIGKILL)
    elif how == "ended_while_down":
        release.touch()
    if how != "followed":
        wait_for(lambda: group_gone(pid), 120, "the job's process group to end")
    again = serve(again=True)
    if how == "followed":  # still running, and still holding off a second job
        assert again.get(f"{JOBS}/{job_id}").json()["state"] == "running"
        assert again.post(TRIGGER).json()["error"] == "busy"
        release.touch()
    job = again.wait_job(job_id)
    assert job["finished"], job
    if how != "killed":  # it ended on its own, without the server that knew its exit code:
        # judged from the answer it printed, as the CLI prints one only once done
        assert job["state"] == "succeeded", job
        assert job["error"].startswith(RESTARTED) and "unknown" in job["error"]
        assert complete_ids(ws) == [backup_id]
    else:
        assert job["state"] == "failed", job
        assert job["error"] == RESTARTED
        assert complete_ids(ws) == []


# -- restore ---------------------------------------------------------------------------


def test_restore_refusals_start_no_job(api: Api) -> None:
    known = "20260101T000000Z"
    cases: list[tuple[str, Any, int, str]] = [
        (known, None, 422, "confirm_mismatch"),  # no body
        (known, {}, 422, "confirm_mismatch"),
        (known, {"confirm": "20260101T000000Z-1"}, 422, "confirm_mismatch"),
        (known, {"confirm": "latest"}, 422, "confirm_mismatch"),
        ("latest", {"confirm": "latest"}, 422, "bad_backup_id"),  # a concrete id only
        ("x%00y", {"confirm": "x\x00y"}, 422, "bad_backup_id"),
        (known, {"confirm": known}, 404, "backup_not_found"),
        (known, {"confirm": known, "only": "everything"}, 422, "bad_input"),
        (known, {"confirm": known, "uploads_to": "/tmp/x"}, 422, "bad_input"),
    ]
    for backup_id, body, status, code in cases:
        answer = api.post(restore_path(backup_id), json=body)
        assert (answer.status_code, answer.json()["error"]) == (status, code), (body, answer.text)
    assert api.post(restore_path(known), json={"confirm": known},
                    role="viewer").status_code == 403
    assert api.get(JOBS).json() == {"jobs": []}
    outcomes = [e["outcome"] for e in audited(api, "restore")]
    assert outcomes == ["refused: confirm_mismatch"] * 4 + ["refused: bad_backup_id"] * 2 \
        + ["refused: backup_not_found", "refused: bad_input", "refused: bad_input",
           "refused: forbidden"]  # the last three refused before the route ran


def test_restore_in_place_then_estimated_from_a_drill(api: Api, ws: Workspace) -> None:
    made = ws.run("backup", "--json")
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    manifest = json.loads((ws.backups / backup_id / "manifest.json").read_text())
    live = ws.cluster.url(ws.dbname)
    expected = table_row_counts(live)
    assert manifest["database"]["tables"] == expected
    table = next(name for name, rows in expected.items() if rows)
    truncate = sql.SQL("TRUNCATE {} CASCADE").format(sql.Identifier(*table.split(".", 1)))
    ws.cluster.execute(truncate, dbname=ws.dbname)  # what the restore undoes
    assert table_row_counts(live) != expected

    # A job that fails: its error is the CLI's, and it says why.
    taken = api.post(restore_path(backup_id), json={
        "confirm": backup_id, "to_database": ws.dbname, "only": "database"}).json()
    failed = api.wait_job(taken["jobId"])
    assert (failed["state"], failed["exit_code"]) == ("failed", 2)
    assert "already exists" in failed["error"]

    answer = api.post(restore_path(backup_id), json={"confirm": backup_id, "only": "database"})
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["success"] is True and body["message"] == "Restauração iniciada"
    assert (body["estimatedTime"], body["estimatedSeconds"]) == (None, None)
    assert body["estimateReason"] == NO_DRILL and body["estimate"]["reason"] == NO_DRILL
    job = api.wait_job(body["jobId"])
    assert (job["state"], job["kind"], job["backup_id"]) == ("succeeded", "restore", backup_id)
    assert job["result"]["safety_backup_id"], "an in-place restore backs up the live state"
    assert job["result"]["safety_backup_id"] in complete_ids(ws)
    assert table_row_counts(live) == expected

    drilled = ws.run("verify", "--drill", backup_id, timeout=300)
    assert drilled.returncode == 0, drilled.stderr
    copy = f"{ws.dbname}_copy"
    body = api.post(restore_path(backup_id), json={
        "confirm": backup_id, "to_database": copy, "only": "database"}).json()
    assert isinstance(body["estimatedSeconds"], int) and body["estimatedSeconds"] >= 1
    assert body["estimatedTime"] == human_duration(body["estimatedSeconds"])
    assert body["estimateReason"] is None
    assert body["estimate"]["drills"] == [f"{backup_id} on local"]
    assert api.wait_job(body["jobId"])["state"] == "succeeded"
    assert table_row_counts(ws.cluster.url(copy)) == expected
    assert [(e["outcome"], e["backup_id"]) for e in audited(api, "restore")] \
        == [("ok", backup_id)] * 3
