"""``GET /api/admin/backups`` and ``GET /api/admin/backups/status``: the seed's shape plus
ours, answered from a cache that still tells the truth. Real server process, real HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from conexa_backup import process
from conexa_backup.manifest import ID_FORMAT, MANIFEST_NAME
from conexa_backup.server.job import Job, now
from conexa_backup.state import write_json
from tests.apikit import Api, start_api
from tests.conftest import Workspace
from tests.test_failures import assert_ok, backup_ok
from tests.test_trust import flip_byte

LIST = "/api/admin/backups"
STATUS = "/api/admin/backups/status"
SEED_SIZE = re.compile(r"^\d+(?:B|\.\dKB|\.\dMB|\.\dGB|\.\dTB)$")


def listed(api: Api, role: str = "admin", **params: str) -> dict[str, Any]:
    answer = api.get(LIST, role=role, params=params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body: dict[str, Any] = answer.json()
    return body


def scans(api: Api) -> int:
    """How many times the server listed the targets (one log line per scan)."""
    return len(re.findall(r"listed \d+ backup\(s\) on", api.log_text()))


def test_list_shows_a_cli_backup_in_the_seed_shape_beside_list_json(api: Api) -> None:
    assert listed(api)["backups"] == []  # now cached: the backup below must still show
    backup_id = backup_ok(api.ws)  # as cron would run it, beside the server
    body = listed(api, role="viewer")  # a read-only role may list
    assert body["unreachable"] == {} and body["incomplete"] == []
    [entry] = body["backups"]
    assert entry["id"] == backup_id
    assert entry["date"] == f"{backup_id[:4]}-{backup_id[4:6]}-{backup_id[6:8]}"
    assert SEED_SIZE.match(entry["size"]), entry["size"]
    assert entry["status"] == "success"
    assert entry["location"] == ["local"]
    assert entry["kind"] == "scheduled" and entry["state"] == "complete"
    assert entry["targets"] == [{"target": "local", "state": "complete", "verified_at": None,
                                 "damaged_at": None, "why": None, "reason": None}]
    [cli] = json.loads(assert_ok(api.ws.run("list", "--json")))
    assert entry["size_bytes"] == cli["size_bytes"] > 0
    for key, value in cli.items():  # every field of list --json, the same
        if key not in ("status", "targets"):
            assert entry[key] == value, key


def test_list_after_a_cli_verify_found_damage_says_damaged_at_once(api: Api) -> None:
    backup_id = backup_ok(api.ws)
    assert assert_ok(api.ws.run("verify", backup_id))
    [entry] = listed(api)["backups"]
    assert entry["status"] == "success"
    assert entry["targets"][0]["verified_at"] is not None
    [dump] = (api.ws.backups / backup_id).glob("database.*")
    flip_byte(dump)
    assert api.ws.run("verify", backup_id).returncode != 0
    [entry] = listed(api)["backups"]  # well within the 30 s the snapshot lives
    assert entry["status"] == "damaged" and entry["state"] == "damaged"
    assert entry["location"] == []
    [copy] = entry["targets"]
    assert copy["state"] == "damaged" and copy["damaged_at"] is not None
    assert "verify" in copy["why"]
    status = api.get(STATUS, role="viewer").json()
    assert status["status"] == "CRITICAL"  # no good copy left: as `status` says
    assert status["newest_backup"]["status"] == "damaged"
    assert status["last_backup"] is None  # status --json: the newest *trusted* backup


def wait_for_scans(api: Api, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while scans(api) < count:
        assert time.monotonic() < deadline, f"fewer than {count} scans:\n{api.log_text()}"
        time.sleep(0.05)


def test_the_server_lists_at_start_then_once_for_twenty_requests(api: Api) -> None:
    wait_for_scans(api, 1)  # taken as the server starts, before any request
    backup_id = backup_ok(api.ws)  # changes runs.json: the snapshot is outdated
    for hours in range(1, 300):  # so that the scan takes a while (manifests not cached)
        copy_backup(api.ws, backup_id, hours)
    answers: list[httpx.Response] = []
    start = threading.Barrier(20)
    headers = api.headers("viewer")

    def one() -> None:
        start.wait()
        answers.append(httpx.get(f"{api.url}{LIST}", headers=headers, timeout=120))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.content for a in answers}) == 1
    assert len(json.loads(answers[0].content)["backups"]) == 300
    assert scans(api) == 2  # one for all twenty
    listed(api)
    assert api.get(STATUS).status_code == 200
    assert scans(api) == 2  # answered from the snapshot, status too


def test_a_target_that_cannot_be_listed_is_said_and_the_others_shown(ws: Workspace) -> None:
    backup_id = backup_ok(ws)
    broken = ws.root / "not-a-folder"
    broken.write_text("x")
    api = start_api(ws, config_extra=f'[[targets]]\nname = "nas"\ntype = "local"\n'
                                     f'path = "{broken}"\n')
    try:
        body = listed(api)
        assert [b["id"] for b in body["backups"]] == [backup_id]
        assert body["backups"][0]["location"] == ["local"]
        assert list(body["unreachable"]) == ["nas"]
        assert "not a folder" in body["unreachable"]["nas"]
        only = listed(api, target="local")
        assert [b["id"] for b in only["backups"]] == [backup_id]
        assert only["unreachable"] == {}
        refused = api.get(LIST, params={"target": "nas"})
        assert refused.status_code == 503
        assert refused.json()["error"] == "target_unreachable"
        unknown = api.get(LIST, params={"target": "elsewhere"})
        assert unknown.status_code == 422
        status = api.get(STATUS).json()
        assert [t["status"] for t in status["targets"]] == ["WARNING", "UNKNOWN"]
    finally:
        api.stop()


def test_no_target_listed_is_503_for_list_and_status(ws: Workspace) -> None:
    ws.backups.write_text("not a folder")
    api = start_api(ws)
    try:
        for path in (LIST, STATUS):
            answer = api.get(path)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "target_unreachable"
            assert "not a folder" in answer.json()["message"]
    finally:
        api.stop()


def write_running_job(state_dir: Path, pid: int) -> Job:
    """A backup job recorded running as process ``pid``, as the server's JobStore keeps one
    (a server started now follows it until that process ends)."""
    job = Job("StatusTestJob-01", "backup", {}, "maria@escola", state="running",
              started=now(), pid=pid, pid_start=process.start_time(pid))
    folder = state_dir / "jobs"
    folder.mkdir(mode=0o700, exist_ok=True)
    write_json(folder / f"{job.id}.json", job.to_json())
    return job


def test_status_is_status_json_plus_the_running_job(api: Api) -> None:
    backup_id = backup_ok(api.ws)
    status = api.get(STATUS, role="viewer").json()
    cli = json.loads(api.ws.run("status", "--json").stdout)
    for key in ("status", "code", "incomplete_backups", "last_backup_run"):
        assert status[key] == cli[key], key
    assert status["last_backup"]["id"] == backup_id
    assert [t["target"] for t in status["targets"]] == ["local"]
    assert status["newest_backup"]["id"] == backup_id
    assert status["newest_backup"]["status"] == "success"
    assert status["running_job"] is None
    child = sleeper()
    try:
        job = write_running_job(api.ws.state, child.pid)
        running = api.get(STATUS).json()["running_job"]
        assert running["id"] == job.id
        assert running["kind"] == "backup" and running["state"] == "running"
        assert running["sub"] == "maria@escola"
    finally:
        child.kill()
        child.wait()


def sleeper() -> subprocess.Popen[bytes]:
    """A stand-in for a job's child, in its own session (a clean-up that kills a job's
    process group must never reach pytest)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            start_new_session=True)


def copy_backup(ws: Workspace, backup_id: str, hours: int = 1) -> str:
    """The backup again on the local target under an id ``hours`` later (its files hard
    links), as a job's backup appears: no state file touched."""
    manifest = json.loads((ws.backups / backup_id / MANIFEST_NAME).read_bytes())
    later = datetime.fromisoformat(manifest["started_at"]) + timedelta(hours=hours)
    new_id = later.strftime(ID_FORMAT)
    (ws.backups / new_id).mkdir(mode=0o700)
    for item in (ws.backups / backup_id).iterdir():
        if item.name != MANIFEST_NAME:
            os.link(item, ws.backups / new_id / item.name)
    edited = {**manifest, "id": new_id, "started_at": later.isoformat(),
              "finished_at": later.isoformat()}
    (ws.backups / new_id / MANIFEST_NAME).write_text(json.dumps(edited))
    return new_id


def test_a_job_that_ends_makes_the_list_look_again(ws: Workspace) -> None:
    backup_id = backup_ok(ws)
    child = sleeper()
    try:
        write_running_job(ws.state, child.pid)  # the server follows it from its start
        api = start_api(ws)
        try:
            assert [b["id"] for b in listed(api)["backups"]] == [backup_id]
            new_id = copy_backup(ws, backup_id)
            child.kill()
            child.wait()
            deadline = time.monotonic() + 20  # the snapshot would live 30 s
            while [b["id"] for b in listed(api)["backups"]] != [new_id, backup_id]:
                assert time.monotonic() < deadline, "the list did not look again"
                time.sleep(0.2)
        finally:
            api.stop()
    finally:
        child.kill()
        child.wait()


class SilentServer:
    """A TCP server that accepts connections and never answers: a target that hangs."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[Any] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_a_target_that_hangs_holds_no_request_for_long(ws: Workspace) -> None:
    """Found by review: a scan stuck on a target held every worker thread (health and plain
    401s timed out) and SIGTERM could not stop the server."""
    silent = SilentServer()
    hung = (f'[[targets]]\nname = "hung"\ntype = "s3"\nbucket = "hung-bucket"\nretries = 1\n'
            f'endpoint_url = "http://127.0.0.1:{silent.port}"\n'
            'access_key_id = "k"\nsecret_access_key = "s"\n')
    api = start_api(ws, config_extra=hung)
    try:
        answers: list[httpx.Response] = []

        def ask() -> None:
            answers.append(api.get(LIST, timeout=120))
        askers = [threading.Thread(target=ask) for _ in range(45)]  # above anyio's 40 workers
        for t in askers:
            t.start()
        started = time.monotonic()
        assert httpx.get(f"{api.url}/healthz", timeout=10).status_code == 200
        junk = api.get(STATUS, token="not-a-token", timeout=120)
        assert (junk.status_code, junk.json()["error"]) == (401, "malformed_token")
        for t in askers:
            t.join(timeout=120)
        assert time.monotonic() - started < 100  # the S3 read alone would take 120 s
        assert {(a.status_code, a.json()["error"]) for a in answers} \
            == {(503, "listing_in_progress")}
        stopped = time.monotonic()
        assert api.stop(timeout=60) == 0
        assert time.monotonic() - stopped < 45
    finally:
        if api.proc.poll() is None:
            api.kill()
        silent.close()
