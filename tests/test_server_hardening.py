"""`conexa-backup serve` as deployed: HTTPS with the configured certificate, CORS closed by
default and open to configured origins only, a bounded load on loopback (answers stay right,
the server stays up and its memory bounded), and the systemd unit in examples/."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conexa_backup.testing.cluster import Cluster
from tests.apikit import (
    START_TIMEOUT,
    Api,
    free_port,
    make_token,
    running,
    server_section,
    start_api,
    stop_jobs,
)
from tests.conftest import Workspace, module_workspace

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "examples" / "conexa-backup-api.service"
APP = "https://conexa.example"


@pytest.fixture(scope="module")
def mws(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[Workspace]:
    """A workspace for the module's servers (one database, uploads, a local target)."""
    ws = module_workspace(tmp_path_factory.mktemp("hardening"), cluster)
    yield ws
    stop_jobs(ws.state)
    cluster.drop_database(ws.dbname)


def sibling(ws: Workspace, name: str) -> Workspace:
    """``ws`` with its own config file and server logs (same database, state and target)."""
    other = dataclasses.replace(ws, root=ws.root / name, config=ws.root / name / "backup.toml")
    other.root.mkdir(exist_ok=True)
    return other


# -- TLS ----------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (both 0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "conexa-backup test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "tls.crt", folder / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    for path in (cert_path, key_path):
        path.chmod(0o600)
    return cert_path, key_path


def trusting(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


def start_tls(ws: Workspace, cert: Path, key: Path, listen_host: str) -> tuple[Api, str]:
    """``serve --listen HOST:PORT`` with TLS configured; returns it and its https URL on
    127.0.0.1 once ``/healthz`` answers there. (apikit's servers speak plain http.) Tries
    another port if another process took the free one first."""
    for _ in range(3):
        port = free_port()
        tls = f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
        ws.write_config(server_section(f"127.0.0.1:{port}", server=tls))
        ws.config.chmod(0o600)
        log = ws.root / f"serve-tls-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "conexa_backup", "--config", str(ws.config), "serve",
                 "--listen", f"{listen_host}:{port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        api = Api(ws, f"https://127.0.0.1:{port}", proc, log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{api.url}/healthz", verify=trusting(cert),
                             timeout=2).is_success:
                    return api, api.url
            time.sleep(0.05)
        api.kill()
        if "address already in use" not in api.log_text():
            break
    pytest.fail(f"serve with TLS did not start:\n{api.log_text()}")


@pytest.fixture(scope="module")
def tls(mws: Workspace) -> tuple[Path, Path]:
    return self_signed(mws.root)


def test_https_on_loopback_serves_the_configured_certificate(
        mws: Workspace, tls: tuple[Path, Path]) -> None:
    cert, key = tls
    api, url = start_tls(sibling(mws, "tls"), cert, key, "127.0.0.1")
    with running(api):
        with httpx.Client(base_url=url, verify=trusting(cert), timeout=30) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            refused = client.get("/api/admin/backups")
            assert (refused.status_code, refused.json()["error"]) == (401, "missing_token")
            token = make_token("viewer")
            answer = client.get("/api/admin/backups", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code not in (401, 403), answer.text
        served = ssl.get_server_certificate(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        assert x509.load_pem_x509_certificate(served.encode()) == \
            x509.load_pem_x509_certificate(cert.read_bytes())
        with pytest.raises(httpx.HTTPError):  # not trusted by the system's CAs: really ours
            httpx.get(f"{url}/healthz", timeout=10)
        with pytest.raises(httpx.HTTPError):  # and never in clear on the same port
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)


def test_a_public_listen_starts_with_tls(mws: Workspace, tls: tuple[Path, Path]) -> None:
    """0.0.0.0 is refused in plain http (test_server_app); with the certificate it starts
    (reached here over loopback, the only address this machine offers)."""
    cert, key = tls
    api, url = start_tls(sibling(mws, "tls-public"), cert, key, "0.0.0.0")  # noqa: S104
    with running(api):
        assert httpx.get(f"{url}/healthz", verify=trusting(cert), timeout=30).is_success
        assert "https://0.0.0.0:" in api.log_text()


# -- CORS ---------------------------------------------------------------------------------


def preflight(api: Api, origin: str) -> httpx.Response:
    return api.request("OPTIONS", "/api/admin/backups", role=None, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})


@pytest.fixture(scope="module")
def plain_api(mws: Workspace) -> Iterator[Api]:
    """The default [server]: no CORS, HS256 (apikit's roles)."""
    with running(start_api(sibling(mws, "plain"))) as api:
        yield api


def test_no_cors_by_default(plain_api: Api) -> None:
    answer = preflight(plain_api, APP)
    assert answer.status_code >= 400
    assert "access-control-allow-origin" not in answer.headers
    simple = plain_api.get("/api/admin/backups", role="viewer", headers={"Origin": APP})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_only_for_the_configured_origins(mws: Workspace) -> None:
    server = f'cors_origins = ["{APP}"]\n'
    with running(start_api(sibling(mws, "cors"), server=server)) as api:
        allowed = preflight(api, APP)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == APP
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in allowed.headers  # bearer, not cookies
        other = preflight(api, "https://evil.example")
        assert other.status_code == 400
        assert "access-control-allow-origin" not in other.headers
        # The app's page can read a refusal's JSON (its code), another origin's cannot.
        refused = api.get("/api/admin/backups", role=None, headers={"Origin": APP})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == APP
        stranger = api.get("/api/admin/backups", role=None,
                           headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers


# -- behind a reverse proxy ---------------------------------------------------------------


def logged_clients(api: Api, marker: str) -> list[str]:
    """The client addresses of the request log's lines for ``marker`` (a path)."""
    lines = [line for line in api.log_text().splitlines()
             if "uvicorn.access" in line and marker in line]
    return [line.split("uvicorn.access: ", 1)[1].split(" ", 1)[0].rsplit(":", 1)[0]
            for line in lines]


def wait_logged(api: Api, marker: str) -> list[str]:
    deadline = time.monotonic() + 30
    while not (found := logged_clients(api, marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_x_forwarded_for_is_ignored_unless_from_a_trusted_proxy(plain_api: Api,
                                                                mws: Workspace) -> None:
    """The audit log's client address is the socket's, so a caller cannot name itself;
    with ``trusted_proxies`` (the proxy's address) it is the one the proxy forwards."""
    forged = {"X-Forwarded-For": "203.0.113.7"}
    plain_api.get("/healthz?forged", role=None, headers=forged)
    assert wait_logged(plain_api, "/healthz?forged") == ["127.0.0.1"]
    server = 'trusted_proxies = ["127.0.0.0/8"]\n'
    with running(start_api(sibling(mws, "proxied"), server=server)) as api:
        api.get("/healthz?proxied", role=None, headers=forged)
        assert wait_logged(api, "/healthz?proxied") == ["203.0.113.7"]


@pytest.mark.parametrize("value", ["*", "proxy.example", "10.0.0.1/8"])
def test_trusted_proxies_must_be_addresses(mws: Workspace, value: str) -> None:
    ws = sibling(mws, "bad-proxies")
    ws.write_config(server_section("127.0.0.1:8765", server=f'trusted_proxies = ["{value}"]\n'))
    result = ws.run("serve", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "trusted_proxies" in result.stderr and "not an IP address" in result.stderr


# -- load ---------------------------------------------------------------------------------

THREADS, REQUESTS = 20, 50


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_bounded_load_answers_right_and_leaves_the_server_healthy(plain_api: Api) -> None:
    """20 clients x 50 requests of health, status with a good token, with a bad one and with
    none: every answer is the expected one and the server is healthy after. No timing is
    asserted (a busy 2-core machine); the count is bounded, and each request's time."""
    api, good = plain_api, make_token("viewer", lifetime=600)
    bad = make_token("viewer", secret="not-the-secret-" * 3)
    plan = [("/healthz", None, 200, None),
            ("/api/admin/backups/status", good, 200, None),
            ("/api/admin/backups/status", good, 200, None),
            ("/api/admin/backups/status", bad, 401, "bad_signature"),
            ("/api/admin/backups/status", None, 401, "missing_token")]
    for path, token, _, _ in plan:  # warm: imports, caches, the threadpool
        api.get(path, role=None, token=token)
    before = rss_kib(api.proc.pid)
    unexpected: list[str] = []
    seen: Counter[int] = Counter()
    lock = threading.Lock()

    def client(number: int) -> None:
        with httpx.Client(base_url=api.url, timeout=60) as http:
            for i in range(REQUESTS):
                path, token, status, code = plan[(number + i) % len(plan)]
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                answer = http.get(path, headers=headers)
                got = answer.json().get("error") if answer.status_code != 200 else None
                ok = (answer.status_code, got) == (status, code)
                with lock:
                    seen[answer.status_code] += 1
                    if not ok:
                        unexpected.append(f"{path} -> {answer.status_code} {answer.text[:200]}")

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(client, n) for n in range(THREADS)]:
            future.result(timeout=240)
    assert not unexpected, unexpected[:5]
    assert sum(seen.values()) == THREADS * REQUESTS
    assert not any(status >= 500 for status in seen)
    assert httpx.get(f"{api.url}/healthz", timeout=30).json() == {"status": "ok"}
    after = rss_kib(api.proc.pid)
    assert after < before + 64 * 1024, f"RSS grew from {before} KiB to {after} KiB"
    assert "Traceback" not in api.log_text()


# -- the systemd unit ---------------------------------------------------------------------


def unit_keys() -> dict[str, dict[str, list[str]]]:
    """The unit's sections and keys; a key set twice keeps every value (ReadWritePaths...)."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            sections[section] = {}
            continue
        key, _, value = line.partition("=")
        sections[section].setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_runs_serve_as_a_dedicated_user_hardened() -> None:
    keys = unit_keys()
    service = {k: v[-1] for k, v in keys["Service"].items()}
    assert service["ExecStart"].split()[:1] == ["/usr/local/bin/conexa-backup"]
    assert service["ExecStart"].split()[-1] == "serve"
    assert service["User"] == "conexa-backup" and service["Group"] == "conexa-backup"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/conexa-backup/api.env"
    assert service["KillMode"] == "process"  # see the unit's comment: jobs outlive a restart
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes", "UMask": "0077"}.items():
        assert service[key] == value, key
    writable = " ".join(keys["Service"]["ReadWritePaths"]).split()
    assert "/var/lib/conexa-backup" in writable  # state_dir's default
    assert keys["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``verify`` checks every key and that ExecStart's program exists: point it at a
    stand-in (the real one is installed by the README's Install)."""
    stand_in = tmp_path / "conexa-backup"
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(
        "/usr/local/bin/conexa-backup", str(stand_in)), encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "SYSTEMD_LOG_TARGET": "console",
                                 "SYSTEMD_LOG_LEVEL": "notice"})
    output = (result.stdout + result.stderr).strip()
    ours = [line for line in output.splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not ours, output
    # systemd's own score of the sandbox: 0 (locked down) to 10 (none); "OK" is below 4.
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found and float(found.group(1)) < 3.0, result.stdout[-2000:]


def test_an_oversized_body_is_refused_before_it_is_read(plain_api: Api) -> None:
    """FastAPI parses a body before the route's token check: without a limit, anyone could
    make the server hold any size of body in memory (found by review: 400 MiB -> 877 MiB)."""
    before = rss_kib(plain_api.proc.pid)
    path = "/api/admin/backups/20261205T030000Z/restore"
    big = b" " * (8 << 20)
    said = httpx.post(plain_api.url + path, content=big, timeout=60,
                      headers={"Content-Type": "application/json"})
    assert (said.status_code, said.json()["error"]) == (413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(64):
            yield b" " * (128 << 10)
    streamed = httpx.post(plain_api.url + path, content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert (streamed.status_code, streamed.json()["error"]) == (413, "body_too_large")
    assert rss_kib(plain_api.proc.pid) < before + 16 * 1024
    small = plain_api.post(path, json={"confirm": "20261205T030000Z"}, role=None)
    assert small.status_code == 401  # an ordinary body still reaches the token check
