"""`conexa-backup serve` itself: start-up refusals, health, the OpenAPI schema, JSON errors,
a clean stop on SIGTERM. Real server process, real HTTP."""

from __future__ import annotations

import signal
import socket

import httpx
import pytest

from conexa_backup.server.deps import backup_id
from conexa_backup.server.errors import ApiError
from tests.apikit import Api, free_port, start_api
from tests.conftest import Workspace
from tests.test_failures import assert_error


def test_health_needs_no_token_and_says_nothing_more(api: Api) -> None:
    answer = httpx.get(f"{api.url}/healthz", timeout=30)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}


def test_openapi_schema_is_served_under_the_api_prefix(api: Api) -> None:
    answer = api.get("/api/admin/openapi.json", role=None)
    assert answer.status_code == 200
    schema = answer.json()
    assert schema["info"]["title"] == "conexa-backup"
    assert "/healthz" in schema["paths"]


def test_unknown_route_is_a_json_404(api: Api) -> None:
    answer = api.get("/api/admin/nothing-here")
    assert answer.status_code == 404
    assert answer.json()["error"] == "not_found"


def test_sigterm_stops_the_server_cleanly(api: Api) -> None:
    assert api.stop(signal.SIGTERM) == 0
    assert "Traceback" not in api.log_text()


def test_serve_refuses_without_a_server_section(ws: Workspace) -> None:
    result = ws.run("serve", "--listen", f"127.0.0.1:{free_port()}", timeout=60)
    assert_error(result, 2, "[server]")


def test_serve_refuses_a_plain_public_listen(ws: Workspace) -> None:
    api = start_api(ws)  # writes a valid [server] section
    api.stop()
    result = ws.run("serve", "--listen", f"0.0.0.0:{free_port()}", timeout=60)
    assert_error(result, 2, "allow_plain_http")


def test_serve_says_when_its_address_is_taken(ws: Workspace) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        api = start_api(ws)
        api.stop()
        result = ws.run("serve", "--listen", f"127.0.0.1:{port}", timeout=60)
    assert_error(result, 1, f"127.0.0.1:{port}")


@pytest.mark.parametrize("value", ["20261205T030000Z\n", "20261205T030000Z/..", "latest", ""])
def test_a_backup_id_is_the_whole_value_or_refused(value: str) -> None:
    with pytest.raises(ApiError) as refused:
        backup_id(value)
    assert (refused.value.status, refused.value.code) == (422, "bad_backup_id")
    assert backup_id("20261205T030000Z-2") == "20261205T030000Z-2"


def test_insecure_no_auth_serves_loopback_names_only(ws: Workspace) -> None:
    """No token is checked in this mode: a page whose DNS name was rebound to 127.0.0.1
    must not reach the API (its requests name it in Host)."""
    api = start_api(ws, auth="insecure_no_auth = true\n")
    try:
        assert api.get("/api/admin/backups", role=None).status_code == 200
        assert api.get("/api/admin/backups", role=None,
                       headers={"Host": "localhost"}).status_code == 200
        rebound = api.get("/api/admin/backups", role=None,
                          headers={"Host": "evil.example:8765"})
        assert (rebound.status_code, rebound.json()["error"]) == (421, "bad_host")
        assert "EVERY REQUEST IS TREATED AS AN ADMIN" in api.log_text()
    finally:
        api.stop()
