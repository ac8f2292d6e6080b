"""``DELETE /api/admin/backups/{id}`` and the CLI's ``delete``: what prune always keeps is
refused (actions.prune.must_keep), per target; the run lock is taken. Real server, real HTTP,
the real PostgreSQL cluster, moto for Object Lock."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from conexa_backup.errors import BusyError
from conexa_backup.server.jobs import JobStore
from conexa_backup.server.tokens import create_machine_token
from conexa_backup.testing.emulators import S3Server
from tests.apikit import ADMIN_SUB, SECRET, Api, make_token, start_api
from tests.conftest import Workspace
from tests.test_failures import backup_ok, listed_by_id, lock_held, target_entries
from tests.test_server_jobs import wait_done
from tests.test_trust import locked_bucket as locked_bucket  # a fixture, used by name
from tests.test_trust import s3_target_toml

# pytest-httpserver listens on "localhost" by default, which may resolve to ::1 first.
os.environ.setdefault("PYTEST_HTTPSERVER_HOST", "127.0.0.1")
PATH = "/api/admin/backups/{}"


def two_backups(ws: Workspace) -> tuple[str, str]:
    """Two backups, oldest first."""
    return backup_ok(ws), backup_ok(ws)


def delete(api: Api, backup_id: str, **kwargs: Any) -> Any:
    return api.delete(PATH.format(backup_id), **kwargs)


def test_delete_an_old_backup_removes_it(ws: Workspace, api: Api) -> None:
    old, new = two_backups(ws)
    shown = [b["id"] for b in api.get("/api/admin/backups").json()["backups"]]
    assert shown == [new, old]  # the list's snapshot now holds both
    answer = delete(api, old)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"success": True, "backupId": old, "deleted": ["local"],
                             "kept": {}, "unreachable": {}}
    assert not (ws.backups / old).exists()
    assert list(listed_by_id(ws)) == [new]
    # The list says so at once, not when its snapshot ages out.
    assert [b["id"] for b in api.get("/api/admin/backups").json()["backups"]] == [new]
    again = delete(api, old)  # gone: as unknown as any id
    assert again.status_code == 404 and again.json()["error"] == "backup_not_found"


def test_the_newest_backup_is_refused_and_nothing_deleted(ws: Workspace, api: Api) -> None:
    old, new = two_backups(ws)
    before = target_entries(ws.backups)
    answer = delete(api, new)
    assert answer.status_code == 409, answer.text
    body = answer.json()
    assert body["error"] == "backup_protected"
    assert body["kept"] == {"local": "newest complete backup"}
    assert "newest complete backup" in body["message"]
    assert target_entries(ws.backups) == before
    assert set(listed_by_id(ws)) == {old, new}


def test_the_newest_verified_backup_is_refused_until_a_newer_one_passes(
        ws: Workspace, api: Api) -> None:
    old, new = two_backups(ws)
    assert ws.run("verify", old).returncode == 0
    answer = delete(api, old)
    assert answer.status_code == 409, answer.text
    assert answer.json()["kept"] == {"local": "newest verified backup"}
    assert (ws.backups / old / "manifest.json").exists()
    assert ws.run("verify", new).returncode == 0  # now the newest verified one is another
    assert delete(api, old).status_code == 200
    assert list(listed_by_id(ws)) == [new]


SECOND = '[[targets]]\nname = "second"\ntype = "local"\npath = "{}"\n'


def test_target_deletes_one_copy_and_each_target_is_judged_alone(ws: Workspace) -> None:
    second = ws.root / "second"
    api = start_api(ws, config_extra=SECOND.format(second))
    try:
        old, middle = two_backups(ws)
        answer = delete(api, old, params={"target": "second"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["deleted"] == ["second"] and answer.json()["kept"] == {}
        assert not (second / old).exists() and (ws.backups / old / "manifest.json").exists()
        assert listed_by_id(ws)[old]["targets"] == ["local"]

        # Newest on "second" (the last backup there), not on "local": only local's copy goes.
        assert ws.run("backup", "--target", "local").returncode == 0
        answer = delete(api, middle)
        assert answer.status_code == 200, answer.text
        assert answer.json()["deleted"] == ["local"]
        assert answer.json()["kept"] == {"second": "newest complete backup"}
        assert listed_by_id(ws)[middle]["targets"] == ["second"]

        unknown = delete(api, old, params={"target": "nope"})
        assert unknown.status_code == 422 and "nope" in unknown.json()["message"]
    finally:
        api.stop()


def test_a_target_that_cannot_be_listed_is_said_and_never_taken_for_no_backup(
        ws: Workspace) -> None:
    (ws.root / "blocker").write_text("a file where a folder should be")
    api = start_api(ws, config_extra=SECOND.format(ws.root / "blocker"))
    try:
        old, _ = (backup_local(ws), backup_local(ws))
        answer = delete(api, old)
        assert answer.status_code == 200, answer.text
        assert answer.json()["deleted"] == ["local"]
        assert list(answer.json()["unreachable"]) == ["second"]
        # Gone from the targets listed, maybe still on the one that was not: not a 404.
        unknown = delete(api, old)
        assert unknown.status_code == 503 and unknown.json()["error"] == "target_unreachable"
    finally:
        api.stop()


def backup_local(ws: Workspace) -> str:
    result = ws.run("backup", "--target", "local")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_viewer_or_no_token_is_refused_and_audited(ws: Workspace, api: Api) -> None:
    old, _ = two_backups(ws)
    before = target_entries(ws.backups)
    viewer = delete(api, old, role="viewer")
    assert viewer.status_code == 403 and viewer.json()["error"] == "forbidden"
    anonymous = delete(api, old, role=None)
    assert anonymous.status_code == 401
    assert target_entries(ws.backups) == before
    lines = [(e["action"], e["sub"], e["outcome"], e["backup_id"]) for e in api.audit()]
    assert lines == [("delete", ADMIN_SUB, "refused: forbidden", old),
                     ("delete", "-", "refused: missing_token", old)]


@pytest.mark.parametrize("bad", ["%2e%2e", "..%2F..%2Fetc", "x" * 100, "20261205T030000Z%00",
                                 "latest"])
def test_bad_ids_are_refused(ws: Workspace, api: Api, bad: str) -> None:
    answer = api.delete(f"/api/admin/backups/{bad}")
    assert answer.status_code in (404, 422), answer.text
    assert answer.json()["error"] in ("bad_backup_id", "not_found")
    assert not ws.backups.exists() or target_entries(ws.backups) == set()


def test_an_unknown_id_is_404(api: Api) -> None:
    answer = delete(api, "20000101T000000Z")
    assert answer.status_code == 404 and answer.json()["error"] == "backup_not_found"
    assert api.audit()[-1]["outcome"] == "refused: backup_not_found"


def test_delete_while_a_cli_run_holds_the_lock_is_busy(ws: Workspace, api: Api) -> None:
    old, _ = two_backups(ws)
    before = target_entries(ws.backups)
    with lock_held(ws.state) as holder:
        answer = delete(api, old)
        assert answer.status_code == 409, answer.text
        body = answer.json()
        assert body["error"] == "busy" and body["holder"] == f"pid {holder.pid}, test holder"
        assert body["since"]
        assert target_entries(ws.backups) == before
    assert api.audit()[-1]["outcome"] == "refused: busy"
    assert delete(api, old).status_code == 200  # the lock is free again: ours was released


def test_a_job_start_is_busy_while_a_delete_holds_the_lock(ws: Workspace) -> None:
    """The server's delete takes the same flock as a CLI run: a backup started meanwhile
    (here by the CLI) is refused with exit 4, naming the delete."""
    old, _ = two_backups(ws)
    store = JobStore(ws.state, ws.config)
    with store.exclusive(f"delete {old} (api)"):
        result = ws.run("backup")
        assert result.returncode == 4 and f"delete {old} (api)" in result.stderr
        with pytest.raises(BusyError) as busy:
            store.start("backup", {}, ADMIN_SUB)
        assert busy.value.holder == f"pid {os.getpid()}, delete {old} (api)"
    job = store.start("backup", {}, ADMIN_SUB)  # and a job of ours keeps a delete out
    with pytest.raises(BusyError) as busy, store.exclusive("delete (api)"):
        pass
    assert busy.value.holder == f"job {job.id} (backup)"
    assert wait_done(store, job.id).state == "succeeded"


# -- the audit log and the admin event ----------------------------------------------------------

def test_audit_lines_name_the_caller_never_the_token(ws: Workspace) -> None:
    machine = create_machine_token(ws.state, "nightly-script", "admin")
    api = start_api(ws)
    try:
        old, new = two_backups(ws)
        jwt_token = make_token("admin")
        assert delete(api, old, token=jwt_token).status_code == 200
        assert delete(api, new, token=jwt_token).status_code == 409
        assert api.get("/api/admin/backups", token=machine).status_code in (200, 501)
        assert api.get("/api/admin/backups", token=machine + "x").status_code == 401
        assert delete(api, old, token="not-a-jwt").status_code == 401
    finally:
        api.stop()
    entries = api.audit()
    assert [(e["action"], e["sub"], e["outcome"]) for e in entries] == [
        ("delete", ADMIN_SUB, "ok"),
        ("delete", ADMIN_SUB, "refused: backup_protected"),
        ("token", "token:nightly-script", entries[2]["outcome"]),
        ("token", "-", "refused: unknown_token"),
        ("delete", "-", "refused: malformed_token"),
    ]
    first = entries[0]
    assert first["backup_id"] == old and first["client"] == "127.0.0.1"
    assert first["detail"] == {"deleted": ["local"], "kept": {}}
    assert entries[2]["detail"] == {"route": "GET /api/admin/backups"}
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first["time"])
    text = (ws.state / "audit.log").read_text(encoding="utf-8")
    for secret in (machine, jwt_token, jwt_token.split(".")[2], SECRET, "not-a-jwt"):
        assert secret not in text
    assert stat.S_IMODE((ws.state / "audit.log").stat().st_mode) == 0o600


def wait_for_requests(server: HTTPServer, path: str, count: int,
                      timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r, _ in server.log if r.path == path]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_admin_event_reaches_a_webhook_that_asks_for_it_only(
        ws: Workspace, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/admin", method="POST").respond_with_data("ok")
    httpserver.expect_request("/failures", method="POST").respond_with_data("ok")
    extra = (f'[[notify]]\ntype = "webhook"\nurl = "{httpserver.url_for("/admin")}"\n'
             f'events = ["admin"]\n'
             f'[[notify]]\ntype = "webhook"\nurl = "{httpserver.url_for("/failures")}"\n')
    api = start_api(ws, config_extra=extra)
    try:
        old, new = two_backups(ws)
        assert delete(api, new).status_code == 409  # refused: audited, not told
        assert delete(api, old).status_code == 200
        (request,) = wait_for_requests(httpserver, "/admin", 1)
    finally:
        api.stop()
    event = json.loads(request.get_data())
    assert event["kind"] == "admin" and event["outcome"] == "success"
    assert event["title"] == f"backup {old} deleted by {ADMIN_SUB}"
    assert event["backup_id"] == old
    assert event["details"]["action"] == "delete" and event["details"]["sub"] == ADMIN_SUB
    assert event["details"]["deleted"] == ["local"]
    assert wait_for_requests(httpserver, "/admin", 2, timeout=1) == [request]  # one event
    assert wait_for_requests(httpserver, "/failures", 1, timeout=1) == []  # failures only
    assert SECRET not in request.get_data(as_text=True)


def test_a_failing_notifier_never_changes_the_answer(ws: Workspace,
                                                     httpserver: HTTPServer) -> None:
    httpserver.expect_request("/admin", method="POST").respond_with_data("down", status=500)
    extra = (f'[[notify]]\ntype = "webhook"\nurl = "{httpserver.url_for("/admin")}"\n'
             f'events = ["admin"]\nretries = 2\ntimeout = 5\n')
    api = start_api(ws, config_extra=extra)
    try:
        old, _ = two_backups(ws)
        answer = delete(api, old)
        assert answer.status_code == 200, answer.text
        assert len(wait_for_requests(httpserver, "/admin", 2)) == 2  # tried, retried
    finally:
        api.stop()
    assert "notification admin/success via webhook failed" in api.log_text()


def test_admin_events_reach_only_notifiers_that_list_admin() -> None:
    from conexa_backup.events import admin_event
    from conexa_backup.notify.webhook import WebhookConfig

    event = admin_event("restore", "maria@escola", "ok", "20261205T030000Z")
    assert event.title == "restore of 20261205T030000Z started by maria@escola"
    failed = admin_event("delete", "maria@escola", "failed: target_unreachable",
                         "20261205T030000Z")
    assert failed.outcome == "failure"
    assert failed.title == ("delete of 20261205T030000Z by maria@escola FAILED "
                            "(target_unreachable)")
    def hook(events: list[str] | None) -> WebhookConfig:
        return WebhookConfig(type="webhook", url="http://127.0.0.1:9/x", events=events)
    assert not hook(None).wants(event) and not hook(None).wants(failed)
    assert not hook(["success", "failure", "restore"]).wants(event)
    assert hook(["admin"]).wants(event) and hook(["admin"]).wants(failed)


# -- the CLI's delete: the same guard, --force to override --------------------------------------

def test_cli_delete_keeps_what_prune_keeps_unless_forced(ws: Workspace) -> None:
    old, new = two_backups(ws)
    refused = ws.run("delete", new, "--yes")
    assert refused.returncode == 1, refused.stderr
    assert "kept on local: newest complete backup" in refused.stderr
    assert "--force" in refused.stderr
    assert set(listed_by_id(ws)) == {old, new}
    assert ws.run("delete", old, "--yes").returncode == 0
    forced = ws.run("delete", new, "--yes", "--force")
    assert forced.returncode == 0, forced.stderr
    assert listed_by_id(ws) == {}


# -- Object Lock (moto) -------------------------------------------------------------------------

def test_an_object_locked_copy_is_refused_before_trying(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    extra = s3_target_toml(s3_server, locked_bucket,
                           'object_lock_mode = "GOVERNANCE"\nobject_lock_days = 2\n')
    api = start_api(ws, config_extra=extra)
    try:
        old, _ = two_backups(ws)
        answer = delete(api, old)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["deleted"] == ["local"]
        assert body["kept"]["s3"].startswith("object-locked (GOVERNANCE) until ")
        assert "s3" in listed_by_id(ws)[old]["targets"]
        # No delete marker was made: nothing was tried on the bucket.
        versions = s3_server.client().list_object_versions(Bucket=locked_bucket,
                                                           Prefix=f"{old}/")
        assert not versions.get("DeleteMarkers")
        again = delete(api, old)
        assert again.status_code == 409 and "object-locked" in again.json()["message"]
    finally:
        api.stop()
