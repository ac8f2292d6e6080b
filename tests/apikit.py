"""A real `conexa-backup serve` for tests: a child process on a free loopback port, driven
over real HTTP (httpx), with HS256 tokens signed by the test.

    api = start_api(ws)                # ws: the conftest Workspace; its config gains [server]
    api.get("/api/admin/backups")      # as an admin (role "admin", sub "maria@escola")
    api.post(path, role="viewer", json={...}); api.request("GET", path, token=None)
    api.stop()                          # SIGTERM, waits; api.kill() is SIGKILL

Use the ``api`` fixture (conftest) for the common case; :func:`start_api` to pass extra ``[server]``
keys, ``[server.auth]`` keys or environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import Workspace

SECRET = "test-secret-0123456789abcdef-0123456789"  # >= 32 bytes: no short-secret warning
ADMIN_SUB = "maria@escola"
ROLES = 'admin_roles = ["admin"]\nread_roles = ["viewer"]\n'  # restore_roles: admin_roles
START_TIMEOUT = 60.0  # seconds: python + FastAPI imports on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_token(role: str | list[str] | None = "admin", *, sub: str = ADMIN_SUB,
               secret: str = SECRET, lifetime: float = 300, **claims: Any) -> str:
    """An HS256 JWT as the app would issue; ``role=None`` leaves the role claim out."""
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(lifetime)}
    if role is not None:
        payload["role"] = role
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


@dataclass
class Api:
    """A running server: its URL, process and log file."""

    ws: Workspace
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, timeout: float = 120) -> httpx.Client:
        made = httpx.Client(base_url=self.url, timeout=timeout)
        self.clients.append(made)
        return made

    def headers(self, role: str | None = "admin", token: str | None = None) -> dict[str, str]:
        """``Authorization`` for ``role`` (a fresh token), or for ``token`` as given;
        ``role=None`` and ``token=None``: no header at all."""
        if token is None and role is not None:
            token = make_token(role)
        return {"Authorization": f"Bearer {token}"} if token is not None else {}

    def request(self, method: str, path: str, *, role: str | None = "admin",
                token: str | None = None, timeout: float = 120, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(role, token), **kwargs.pop("headers", {})}
        with httpx.Client(base_url=self.url, timeout=timeout) as c:
            return c.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def wait_job(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        """Poll ``GET /api/admin/jobs/<id>`` until the job is no longer queued or running."""
        deadline = time.monotonic() + timeout
        while True:
            job: dict[str, Any] = self.get(f"/api/admin/jobs/{job_id}").json()
            if job.get("state") not in ("queued", "running"):
                return job
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {job.get('state')} after {timeout} s")
            time.sleep(0.1)

    def audit(self) -> list[dict[str, Any]]:
        """The audit log's lines, parsed."""
        path = self.ws.state / "audit.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        for c in self.clients:
            c.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def server_section(listen: str, *, server: str = "", auth: str = "") -> str:
    return (f'[server]\nlisten = "{listen}"\n{server}'
            f'[server.auth]\nalgorithms = ["HS256"]\nsecret = "{SECRET}"\n{ROLES}{auth}')


def start_api(ws: Workspace, *, server: str = "", auth: str = "", config_extra: str = "",
              env: dict[str, str] | None = None, write_config: bool = True,
              port: int | None = None) -> Api:
    """Write ``ws``'s config with a ``[server]`` section (unless ``write_config`` is False:
    the config already has one) and start ``conexa-backup serve`` on a free port; returns
    once ``/healthz`` answers. Fails the test, with the server's log, if it does not."""
    for _ in range(3):  # another process may take the free port between probe and bind
        chosen = port or free_port()
        listen = f"127.0.0.1:{chosen}"
        if write_config:
            ws.write_config(config_extra + server_section(listen, server=server, auth=auth))
            ws.config.chmod(0o600)
        log = ws.root / f"serve-{chosen}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "conexa_backup", "--config", str(ws.config), "serve",
                 "--listen", listen],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})})
        api = Api(ws, f"http://{listen}", proc, log)
        if _wait_healthy(api):
            return api
        text = api.log_text()
        if "address already in use" not in text or port is not None:
            pytest.fail(f"serve did not start (exit {proc.poll()}):\n{text}")
    pytest.fail("serve found no free port in 3 tries")


def _wait_healthy(api: Api) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if api.proc.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200:
                return True
        time.sleep(0.05)
    api.kill()
    pytest.fail(f"serve not healthy after {START_TIMEOUT} s:\n{api.log_text()}")


def stop_jobs(state_dir: Path) -> None:
    """SIGKILL the process group of every job still recorded running (a test that ends
    mid-job must not leave a backup running into the next test)."""
    for path in (state_dir / "jobs").glob("*.json") if (state_dir / "jobs").is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            job = json.loads(path.read_text(encoding="utf-8"))
            if job.get("state") in ("queued", "running") and job.get("pid"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(job["pid"]), signal.SIGKILL)


@contextlib.contextmanager
def running(api: Api) -> Iterator[Api]:
    """``api`` for the block; then stopped (SIGTERM, else SIGKILL) and its jobs killed."""
    try:
        yield api
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            api.stop()
        if api.proc.poll() is None:
            api.kill()
        stop_jobs(api.ws.state)
