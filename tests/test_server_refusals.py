"""Every route of `conexa-backup serve` refuses every token issue 14 names, over real HTTP,
with its stable code and no work done; ids that try to leave the target are refused as well.

One real server per auth configuration (HS256 with issuer and audience; RS256 with a public
key file; RS256 with a JWKS on loopback), started once for the module over one real database,
one backup on a local target and one state_dir: the cases are parametrized requests.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer

from conexa_backup.testing.cluster import Cluster
from tests.apikit import SECRET, Api, free_port, start_api, stop_jobs
from tests.conftest import Workspace, module_workspace

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
ISSUER, AUDIENCE = "conexa", "conexa-backup"
# admin_roles = ["admin"], read_roles = ["viewer"] (apikit); "owner" alone may restore/delete.
HS_AUTH = f'restore_roles = ["owner"]\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'
JOB_ID = "AAAAAAAAAAAAAAAA"  # shaped like a job id (16 url-safe characters), of no job
SENTINEL = "sentinel-outside-the-target-7d1f"  # in a file beside the target: never served

# (method, path, what the caller must be allowed): every route of issue 14.
ROUTES = [
    ("GET", "/api/admin/backups", "read"),
    ("GET", "/api/admin/backups/status", "read"),
    ("GET", "/api/admin/backups/{id}/download", "admin"),
    ("POST", "/api/admin/backups/trigger", "admin"),
    ("POST", "/api/admin/backups/{id}/restore", "restore"),
    ("DELETE", "/api/admin/backups/{id}", "restore"),
    ("GET", "/api/admin/jobs", "admin"),
    ("GET", "/api/admin/jobs/{job}", "admin"),
    ("POST", "/api/admin/jobs/{job}/cancel", "admin"),
]
ROUTE_IDS = [f"{m} {p}" for m, p, _ in ROUTES]


@dataclasses.dataclass
class World:
    """The module's database, target (with one backup), state_dir and servers."""

    base: Workspace
    backup_id: str
    machine_token: str  # role viewer
    revoked_token: str
    rsa_key: rsa.RSAPrivateKey
    stranger: rsa.RSAPrivateKey  # a key the app never had
    servers: dict[str, Api] = dataclasses.field(default_factory=dict)

    def target_files(self) -> dict[str, int]:
        root = self.base.backups
        return {str(p.relative_to(root)): p.stat().st_size
                for p in sorted(root.rglob("*")) if p.is_file()}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(role: Any = "admin", **over: Any) -> dict[str, Any]:
    """What the app puts in a token for the HS server (issuer and audience configured)."""
    now = int(time.time())
    payload = {"sub": "maria@escola", "iat": now, "exp": now + 300, "iss": ISSUER,
               "aud": AUDIENCE, "role": role, **over}
    return {k: v for k, v in payload.items() if v is not None}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def cli(ws: Workspace, *args: str) -> str:
    result = ws.run(*args, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[World]:
    root = tmp_path_factory.mktemp("refusals")
    base = module_workspace(root, cluster)
    dbname = base.dbname
    (root / "outside.txt").write_text(SENTINEL, encoding="utf-8")
    backup_id = cli(base, "backup").splitlines()[-1]
    # Machine tokens need [server]: the HS server's config (written by start_api) has it.
    hs_ws = dataclasses.replace(base, root=root / "hs", config=root / "hs" / "backup.toml")
    hs_ws.root.mkdir()
    world = World(base, backup_id, "", "", rsa.generate_private_key(65537, 2048),
                  rsa.generate_private_key(65537, 2048))
    try:
        world.servers["hs"] = start_api(hs_ws, auth=HS_AUTH)
        world.machine_token = cli(hs_ws, "serve", "token", "create", "script", "--role",
                                  "viewer")
        world.revoked_token = cli(hs_ws, "serve", "token", "create", "gone", "--role", "owner")
        cli(hs_ws, "serve", "token", "revoke", "gone")
        yield world
    finally:
        for api in world.servers.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                api.stop()
            if api.proc.poll() is None:
                api.kill()
        stop_jobs(base.state)
        cluster.drop_database(dbname)


def public_pem(world: World) -> bytes:
    data: bytes = world.rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def asymmetric_server(world: World, name: str, auth: str) -> Api:
    """A server over the module's state and target whose [server.auth] is ``auth`` (RS256)."""
    ws = dataclasses.replace(world.base, root=world.base.root / name,
                             config=world.base.root / name / "backup.toml")
    ws.root.mkdir(exist_ok=True)
    port = free_port()
    ws.write_config(f'[server]\nlisten = "127.0.0.1:{port}"\n[server.auth]\n'
                    f'algorithms = ["RS256"]\n{auth}admin_roles = ["admin"]\n'
                    f'read_roles = ["viewer"]\n')
    ws.config.chmod(0o600)
    api = start_api(ws, write_config=False)  # serve --listen on a free port, retried
    world.servers[name] = api
    return api


@pytest.fixture(scope="module")
def hs_api(world: World) -> Api:
    return world.servers["hs"]


@pytest.fixture(scope="module")
def rs_api(world: World) -> Api:
    path = world.base.root / "app-public.pem"
    path.write_bytes(public_pem(world))
    return asymmetric_server(world, "rs", f'public_key_file = "{path}"\n')


@pytest.fixture(scope="module")
def jwks(world: World) -> Iterator[HTTPServer]:
    """The app's JWKS (key ``k1``) over http on loopback."""
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    key = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(world.rsa_key.public_key()))
    server.expect_request("/jwks.json").respond_with_json(
        {"keys": [{**key, "kid": "k1", "alg": "RS256", "use": "sig"}]})
    yield server
    server.clear()
    if server.is_running():
        server.stop()


@pytest.fixture(scope="module")
def jwks_api(world: World, jwks: HTTPServer) -> Api:
    return asymmetric_server(world, "jwks", f'jwks_url = "{jwks.url_for("/jwks.json")}"\n')


# -- what a refusal looks like ------------------------------------------------------------


def path_of(template: str, world: World) -> str:
    return template.format(id=world.backup_id, job=JOB_ID)


def send(api: Api, world: World, method: str, template: str,
         authorization: str | None) -> httpx.Response:
    """One request as the admin panel would send it; a restore carries a valid confirm, so a
    token let through by mistake would really start one."""
    headers = {"Authorization": authorization} if authorization is not None else {}
    body = {"confirm": world.backup_id} if template.endswith("/restore") else None
    return api.request(method, path_of(template, world), role=None, headers=headers,
                       json=body, timeout=60)


def assert_no_work(world: World, before: dict[str, int]) -> None:
    jobs = world.base.state / "jobs"
    assert not (jobs.is_dir() and any(jobs.iterdir())), "a refused request started a job"
    assert world.target_files() == before, "a refused request changed the target"


def assert_refused(answer: httpx.Response, status: int, code: str,
                   authorization: str | None) -> None:
    assert (answer.status_code, answer.headers["content-type"]) == (status, "application/json")
    body = answer.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    token = (authorization or "").partition(" ")[2]
    if len(token) > 8:
        assert token not in answer.text  # a refusal never echoes the token
    assert SECRET not in answer.text


def passes_auth(answer: httpx.Response) -> bool:
    """Let in: the list route answers its list (the token was accepted)."""
    return answer.status_code == 200 and "backups" in answer.json()


# -- HS256 (issuer and audience configured) -------------------------------------------------


def _tampered() -> str:
    header, _, signature = hs(claims("viewer")).split(".")
    return f"{header}.{b64(json.dumps(claims('owner')).encode())}.{signature}"


def _alg_none() -> str:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(claims('owner')).encode())}."


# name -> (Authorization header, made when sent; status; code)
HS_CASES: dict[str, tuple[Callable[[World], str | None], int, str]] = {
    "no-header": (lambda w: None, 401, "missing_token"),
    "basic-scheme": (lambda w: "Basic YWRtaW46YWRtaW4=", 401, "bad_scheme"),
    "bearer-without-token": (lambda w: "Bearer", 401, "bad_scheme"),
    "raw-token-no-scheme": (lambda w: hs(claims("owner")), 401, "bad_scheme"),
    "malformed": (lambda w: "Bearer not-a-jwt", 401, "malformed_token"),
    "malformed-3-parts": (lambda w: "Bearer a.b.c", 401, "malformed_token"),
    "alg-none": (lambda w: f"Bearer {_alg_none()}", 401, "algorithm_not_allowed"),
    "hs512-not-configured": (lambda w: f"Bearer {hs(claims('owner'), alg='HS512')}", 401,
                             "algorithm_not_allowed"),
    "wrong-secret": (lambda w: f"Bearer {hs(claims('owner'), 'x' * 40)}", 401,
                     "bad_signature"),
    "tampered-payload": (lambda w: f"Bearer {_tampered()}", 401, "bad_signature"),
    "expired": (lambda w: "Bearer " + hs(claims("owner", iat=int(time.time()) - 900,
                                                exp=int(time.time()) - 120)),
                401, "token_expired"),
    "not-yet-valid": (lambda w: "Bearer " + hs(claims("owner", nbf=int(time.time()) + 300)),
                      401, "token_not_yet_valid"),
    "no-exp": (lambda w: f"Bearer {hs(claims('owner', exp=None))}", 401, "missing_claim"),
    "wrong-issuer": (lambda w: f"Bearer {hs(claims('owner', iss='evil'))}", 401,
                     "wrong_issuer"),
    "no-issuer": (lambda w: f"Bearer {hs(claims('owner', iss=None))}", 401, "missing_claim"),
    "wrong-audience": (lambda w: f"Bearer {hs(claims('owner', aud='other-api'))}", 401,
                       "wrong_audience"),
    "no-role": (lambda w: f"Bearer {hs(claims(None))}", 403, "no_role"),
    "empty-role-list": (lambda w: f"Bearer {hs(claims([]))}", 403, "no_role"),
    "unknown-role": (lambda w: f"Bearer {hs(claims('teacher'))}", 403, "forbidden_role"),
    "unknown-machine-token": (lambda w: f"Bearer cxb_{secrets.token_urlsafe(32)}", 401,
                              "unknown_token"),
    "revoked-machine-token": (lambda w: f"Bearer {w.revoked_token}", 401, "unknown_token"),
}


@pytest.mark.parametrize(("method", "template", "need"), ROUTES, ids=ROUTE_IDS)
@pytest.mark.parametrize("case", list(HS_CASES))
def test_bad_tokens_are_refused_on_every_route(world: World, hs_api: Api, case: str,
                                               method: str, template: str, need: str) -> None:
    make, status, code = HS_CASES[case]
    before = world.target_files()
    authorization = make(world)
    answer = send(hs_api, world, method, template, authorization)
    assert_refused(answer, status, code, authorization)
    assert_no_work(world, before)


LESSER_ROLES = [(role, route) for route in ROUTES for role in ("viewer", "admin")
                if (role, route[2]) in {("viewer", "admin"), ("viewer", "restore"),
                                        ("admin", "restore")}]


@pytest.mark.parametrize(("role", "route"), LESSER_ROLES,
                         ids=[f"{r}-{m} {p}" for r, (m, p, _) in LESSER_ROLES])
def test_a_role_below_the_route_is_403_forbidden(world: World, hs_api: Api, role: str,
                                                 route: tuple[str, str, str]) -> None:
    """A viewer may only list and see status; an admin who is not in restore_roles may not
    restore or delete."""
    before = world.target_files()
    authorization = f"Bearer {hs(claims(role))}"
    answer = send(hs_api, world, route[0], route[1], authorization)
    assert_refused(answer, 403, "forbidden", authorization)
    assert_no_work(world, before)


def test_a_machine_token_revoked_or_not_is_refused_by_name_on_a_read_route(
        world: World, hs_api: Api) -> None:
    refused = send(hs_api, world, "GET", "/api/admin/backups", f"Bearer {world.revoked_token}")
    assert_refused(refused, 401, "unknown_token", f"Bearer {world.revoked_token}")
    answer = send(hs_api, world, "GET", "/api/admin/backups", f"Bearer {world.machine_token}")
    assert passes_auth(answer), answer.text
    above = send(hs_api, world, "POST", "/api/admin/backups/trigger",
                 f"Bearer {world.machine_token}")
    assert_refused(above, 403, "forbidden", f"Bearer {world.machine_token}")


@pytest.mark.parametrize("role", ["viewer", "admin", "owner", ["teacher", "viewer"]])
def test_good_tokens_pass_on_a_read_route(world: World, hs_api: Api, role: Any) -> None:
    """The control: the server refuses the cases above for their reason, not everything."""
    answer = send(hs_api, world, "GET", "/api/admin/backups", f"Bearer {hs(claims(role))}")
    assert passes_auth(answer), answer.text


def test_within_the_30_s_leeway_passes(world: World, hs_api: Api) -> None:
    now = int(time.time())
    token = hs(claims("viewer", exp=now - 5, nbf=now + 5))
    assert passes_auth(send(hs_api, world, "GET", "/api/admin/backups", f"Bearer {token}"))


# -- RS256: a public key file, and a JWKS ---------------------------------------------------


def _hs256_with_public_key(world: World) -> str:
    """The classic key confusion: the public key (public!) used as an HMAC secret."""
    signing_input = (f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
                     f"{b64(json.dumps(claims('owner')).encode())}")
    mac = hmac.new(public_pem(world), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def rs(world: World, kid: str | None = None, key: rsa.RSAPrivateKey | None = None,
       **over: Any) -> str:
    payload = claims("admin", iss=None, aud=None, **over)
    return jwt.encode(payload, key or world.rsa_key, algorithm="RS256",
                      headers={"kid": kid} if kid else None)


@pytest.mark.parametrize(("method", "template", "need"), ROUTES, ids=ROUTE_IDS)
def test_hs256_signed_with_the_rs256_public_key_is_refused(
        world: World, rs_api: Api, method: str, template: str, need: str) -> None:
    before = world.target_files()
    authorization = f"Bearer {_hs256_with_public_key(world)}"
    answer = send(rs_api, world, method, template, authorization)
    assert_refused(answer, 401, "algorithm_not_allowed", authorization)
    assert_no_work(world, before)


def test_rs256_refusals_and_the_control(world: World, rs_api: Api) -> None:
    cases = [(f"Bearer {rs(world, key=world.stranger)}", 401, "bad_signature"),
             (f"Bearer {rs(world, exp=int(time.time()) - 120)}", 401, "token_expired"),
             (f"Bearer {_alg_none()}", 401, "algorithm_not_allowed")]
    before = world.target_files()
    for authorization, status, code in cases:
        answer = send(rs_api, world, "POST", "/api/admin/backups/trigger", authorization)
        assert_refused(answer, status, code, authorization)
    assert_no_work(world, before)
    assert passes_auth(send(rs_api, world, "GET", "/api/admin/backups", f"Bearer {rs(world)}"))


@pytest.mark.parametrize(("method", "template", "need"), ROUTES, ids=ROUTE_IDS)
def test_unknown_kid_with_a_jwks_is_refused(world: World, jwks_api: Api, method: str,
                                            template: str, need: str) -> None:
    before = world.target_files()
    authorization = f"Bearer {rs(world, kid='not-k1', key=world.stranger)}"
    answer = send(jwks_api, world, method, template, authorization)
    assert_refused(answer, 401, "unknown_key", authorization)
    assert_no_work(world, before)


def test_jwks_known_kid_passes_and_a_forged_one_does_not(world: World, jwks_api: Api) -> None:
    ok = send(jwks_api, world, "GET", "/api/admin/backups", f"Bearer {rs(world, kid='k1')}")
    assert passes_auth(ok), ok.text
    forged = f"Bearer {rs(world, kid='k1', key=world.stranger)}"
    answer = send(jwks_api, world, "DELETE", path_of("/api/admin/backups/{id}", world), forged)
    assert_refused(answer, 401, "bad_signature", forged)


# -- ids that are not ids (as an owner: past every auth check) -------------------------------

BAD_IDS = [
    "..", ".%2e", "%2e%2e", "%2E%2E", "..%2F..%2Foutside.txt", "%2e%2e%2f%2e%2e%2foutside.txt",
    "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "%2F", "%2Fetc%2Fpasswd", "..%5C..%5Coutside.txt",
    "%252e%252e%252foutside.txt", "%00", "20261205T030000Z%00", "..%00", "%00..%2Foutside.txt",
    "20261205T030000Z%2F..%2F..%2Foutside.txt", "A" * 65, "2" * 5000, "%20", "~root",
    "20261205T030000Z%0A",  # "$" of a regex would let the newline through
]
ID_ROUTES = [r for r in ROUTES if "{" in r[1]]


def raw_request(api: Api, method: str, path: str, token: str) -> tuple[int, str, str]:
    """``path`` sent byte for byte (httpx would normalise ``..`` segments away): status,
    content type (or the ``Location`` of a redirect) and body."""
    host, _, port = api.url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        body = json.dumps({"confirm": ".."}) if method == "POST" else None
        conn.request(method, path, body=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        answer = conn.getresponse()
        kind = answer.getheader("location" if answer.status in (307, 308) else "content-type")
        return answer.status, kind or "", answer.read().decode()
    finally:
        conn.close()


@pytest.mark.parametrize(("method", "template", "need"), ID_ROUTES,
                         ids=[f"{m} {p}" for m, p, _ in ID_ROUTES])
def test_ids_that_are_not_ids_never_reach_a_file(world: World, hs_api: Api, method: str,
                                                 template: str, need: str) -> None:
    before = world.target_files()
    token = hs(claims("owner"))
    for bad in BAD_IDS:
        path = template.replace("{id}", bad).replace("{job}", bad)
        status, kind, text = raw_request(hs_api, method, path, token)
        if status in (307, 308):  # "/backups/%2F" is "/backups/": Starlette drops the slash
            assert kind.startswith(f"{hs_api.url}/api/admin/"), (bad, kind)
            continue
        assert status in (400, 404, 405, 422), (bad, status, text)
        assert kind == "application/json" or status == 400, (bad, kind)
        assert SENTINEL not in text and "root:x:0:0" not in text, bad
        if status == 422:
            assert json.loads(text)["error"] in ("bad_backup_id", "bad_input"), (bad, text)
    assert_no_work(world, before)
    assert "Traceback" not in hs_api.log_text()


def test_a_backup_id_route_refuses_dot_dot_as_bad_backup_id(world: World, hs_api: Api) -> None:
    """``/backups/../restore`` reaches the restore route with id ``..``: 422, by name."""
    status, _, text = raw_request(hs_api, "POST", "/api/admin/backups/../restore",
                                  hs(claims("owner")))
    assert (status, json.loads(text)["error"]) == (422, "bad_backup_id")
    status, _, text = raw_request(hs_api, "DELETE", "/api/admin/backups/%2e%2e",
                                  hs(claims("owner")))
    assert (status, json.loads(text)["error"]) == (422, "bad_backup_id")


def test_an_artifact_that_is_a_path_is_refused(world: World, hs_api: Api) -> None:
    path = (f"/api/admin/backups/{world.backup_id}/download"
            f"?artifact=..%2F..%2Foutside.txt&target=..%2F..")
    status, _, text = raw_request(hs_api, "GET", path, hs(claims("owner")))
    assert status in (404, 422), text
    assert SENTINEL not in text
