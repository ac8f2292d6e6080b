"""server/auth.py as plain functions: every token issue 14 says must be refused, the ones it
must accept, roles, machine tokens, and when `serve` must refuse to start. Keys are made here
with `cryptography`; the JWKS is served by a real local HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pytest_httpserver import HTTPServer
from werkzeug import Response

from conexa_backup.config import Config, parse_config
from conexa_backup.errors import ConfigError, UsageError
from conexa_backup.server.auth import (
    JWKS_TIMEOUT,
    AuthError,
    Principal,
    Verifier,
    verify_startup,
)
from conexa_backup.server.tokens import (
    TOKENS,
    create_machine_token,
    find_machine_token,
    issue_machine_token,
    revoke_machine_token,
)

SECRET = "a-shared-secret-of-sixty-four-bytes-for-hs256-hs384-and-hs512!!!"
SRC = Path("/etc/conexa/backup.toml")


def make_config(tmp_path: Path, auth: str, server: str = "") -> Config:
    text = (f'state_dir = "{tmp_path / "state"}"\n[database]\nurl = "postgresql://u@h/db"\n'
            f'[[targets]]\nname = "l"\ntype = "local"\npath = "{tmp_path / "b"}"\n'
            f"[server]\n{server}\n[server.auth]\n{auth}\n")
    return parse_config(text, SRC, {})


def hs_verifier(tmp_path: Path, extra: str = "") -> Verifier:
    return Verifier(make_config(tmp_path, f'secret = "{SECRET}"\n{extra}'))


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "maria@escola", "role": "admin", "iat": now, "exp": now + 300, **over}


def hs(payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, SECRET, algorithm="HS256", headers=headers or None)


def refused(verifier: Verifier, header: str | None) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify_header(header)
    assert SECRET not in str(info.value)
    token = (header or "").partition(" ")[2].strip()
    if len(token) > 8:
        assert token not in info.value.message  # never echo the token
    return info.value


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def key_file(tmp_path: Path, private_key: Any) -> Path:
    path = tmp_path / "app-public.pem"
    path.write_bytes(pem(private_key.public_key()))
    return path


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- accepted -----------------------------------------------------------------------------------

def test_hs256_token_from_the_app_is_accepted(tmp_path: Path) -> None:
    principal = hs_verifier(tmp_path).verify_header(f"Bearer {hs(claims())}")
    assert principal == Principal("maria@escola", "admin", True, True, True)


def test_hs256_secret_from_a_file_with_its_newline(tmp_path: Path) -> None:
    (tmp_path / "jwt.secret").write_text(SECRET + "\n")
    verifier = Verifier(make_config(tmp_path, f'secret_file = "{tmp_path / "jwt.secret"}"'))
    assert verifier.verify_token(hs(claims())).can_admin


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256", "EdDSA"])
def test_asymmetric_tokens_with_a_public_key_file(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                                                  algorithm: str) -> None:
    private: Any = {"ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
                    "EdDSA": ed25519.Ed25519PrivateKey.generate}.get(algorithm, lambda: rsa_key)()
    config = make_config(tmp_path, f'algorithms = ["{algorithm}"]\n'
                                   f'public_key_file = "{key_file(tmp_path, private)}"')
    token = jwt.encode(claims(role="admin"), private, algorithm=algorithm)
    assert Verifier(config).verify_header(f"bearer {token}").sub == "maria@escola"


def test_exp_within_the_30_s_leeway_is_accepted(tmp_path: Path) -> None:
    token = hs(claims(exp=int(time.time()) - 10))
    assert hs_verifier(tmp_path).verify_token(token).can_read


def test_issuer_and_audience_when_configured(tmp_path: Path) -> None:
    verifier = hs_verifier(tmp_path, 'issuer = "conexa-app"\naudience = "conexa-backup"')
    good = hs(claims(iss="conexa-app", aud="conexa-backup"))
    assert verifier.verify_token(good).can_admin
    assert refused(verifier, f"Bearer {hs(claims(iss='evil', aud='conexa-backup'))}").code \
        == "wrong_issuer"
    assert refused(verifier, f"Bearer {hs(claims(iss='conexa-app', aud='other'))}").code \
        == "wrong_audience"
    # Configured means required: a token that leaves them out is refused too.
    assert refused(verifier, f"Bearer {hs(claims(aud='conexa-backup'))}").code == "missing_claim"
    assert refused(verifier, f"Bearer {hs(claims(iss='conexa-app'))}").code == "missing_claim"


# -- refused: the matrix of issue 14 ------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz",
                                    "Token abc"])
def test_no_token_or_not_bearer_is_401(tmp_path: Path, header: str | None) -> None:
    error = refused(hs_verifier(tmp_path), header)
    assert error.status == 401 and error.code in ("missing_token", "bad_scheme")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "a.b", "....", "eyJhbGciOiJIUzI1NiJ9.x.y"])
def test_malformed_token_is_401(tmp_path: Path, token: str) -> None:
    error = refused(hs_verifier(tmp_path), f"Bearer {token}")
    assert error.status == 401 and error.code == "malformed_token"


def test_alg_none_is_401(tmp_path: Path) -> None:
    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    token = f"{header}.{b64(json.dumps(claims()).encode())}."
    error = refused(hs_verifier(tmp_path), f"Bearer {token}")
    assert (error.status, error.code) == (401, "algorithm_not_allowed")


def test_hs256_signed_with_the_rs256_public_key_is_401(tmp_path: Path,
                                                       rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic key confusion: the attacker knows the public key and uses it as an HMAC
    secret; a verifier that let the token pick the algorithm would accept it."""
    path = key_file(tmp_path, rsa_key)
    verifier = Verifier(make_config(tmp_path, f'algorithms = ["RS256"]\n'
                                              f'public_key_file = "{path}"'))
    signing_input = (f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
                     f"{b64(json.dumps(claims()).encode())}")
    mac = hmac.new(path.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    error = refused(verifier, f"Bearer {signing_input}.{b64(mac)}")
    assert (error.status, error.code) == (401, "algorithm_not_allowed")


def test_expired_beyond_the_leeway_is_401(tmp_path: Path) -> None:
    error = refused(hs_verifier(tmp_path), f"Bearer {hs(claims(exp=int(time.time()) - 60))}")
    assert (error.status, error.code) == (401, "token_expired")


def test_without_exp_is_401(tmp_path: Path) -> None:
    payload = claims()
    del payload["exp"]
    error = refused(hs_verifier(tmp_path), f"Bearer {hs(payload)}")
    assert (error.status, error.code) == (401, "missing_claim")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_is_401(tmp_path: Path, claim: str) -> None:
    token = hs(claims(**{claim: int(time.time()) + 120}))
    error = refused(hs_verifier(tmp_path), f"Bearer {token}")
    assert (error.status, error.code) == (401, "token_not_yet_valid")


def test_wrong_secret_is_401(tmp_path: Path) -> None:
    token = jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!", algorithm="HS256")
    error = refused(hs_verifier(tmp_path), f"Bearer {token}")
    assert (error.status, error.code) == (401, "bad_signature")


def test_tampered_payload_is_401(tmp_path: Path) -> None:
    header, _, signature = hs(claims(role="teacher")).split(".")
    forged = f"{header}.{b64(json.dumps(claims(role='admin')).encode())}.{signature}"
    error = refused(hs_verifier(tmp_path, 'read_roles = ["teacher"]'), f"Bearer {forged}")
    assert (error.status, error.code) == (401, "bad_signature")


def test_hs512_token_when_only_hs256_is_configured_is_401(tmp_path: Path) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    assert refused(hs_verifier(tmp_path), f"Bearer {token}").code == "algorithm_not_allowed"


def test_es256_token_against_an_rsa_key_is_401(tmp_path: Path,
                                               rsa_key: rsa.RSAPrivateKey) -> None:
    """Both algorithms configured, but an RSA key never checks an ES256 token."""
    config = make_config(tmp_path, f'algorithms = ["RS256", "ES256"]\n'
                                   f'public_key_file = "{key_file(tmp_path, rsa_key)}"')
    token = jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    assert refused(Verifier(config), f"Bearer {token}").code == "algorithm_not_allowed"


@pytest.mark.parametrize("role", [None, "", 7, ["admin", 7], []])
def test_missing_or_malformed_role_is_403(tmp_path: Path, role: Any) -> None:
    payload = claims(role=role)
    if role is None:
        del payload["role"]
    error = refused(hs_verifier(tmp_path), f"Bearer {hs(payload)}")
    assert error.status == 403 and error.code in ("no_role", "forbidden_role")


@pytest.mark.parametrize("role", ["teacher", "Admin", ["student", "parent"]])
def test_unknown_role_is_403(tmp_path: Path, role: Any) -> None:
    error = refused(hs_verifier(tmp_path), f"Bearer {hs(claims(role=role))}")
    assert (error.status, error.code) == (403, "forbidden_role")


# -- roles --------------------------------------------------------------------------------------

def test_read_admin_and_restore_roles(tmp_path: Path) -> None:
    verifier = hs_verifier(tmp_path, 'role_claim = "perfil"\nread_roles = ["secretaria"]\n'
                                     'admin_roles = ["admin"]\nrestore_roles = ["diretor"]')
    def who(role: Any) -> Principal:
        return verifier.verify_token(hs({**claims(), "perfil": role}))
    assert who("secretaria") == Principal("maria@escola", "secretaria", True, False, False)
    assert who("admin") == Principal("maria@escola", "admin", True, True, False)
    assert who("diretor") == Principal("maria@escola", "diretor", True, True, True)
    assert who(["secretaria", "diretor"]).role == "diretor"  # the strongest role counts
    with pytest.raises(AuthError) as info:
        who("secretaria").require("admin")
    assert info.value.status == 403
    who("diretor").require("restore")
    # The default claim name is not read when another is configured.
    assert refused(verifier, f"Bearer {hs(claims(role='admin'))}").code == "no_role"


def test_restore_roles_default_to_admin_roles(tmp_path: Path) -> None:
    verifier = hs_verifier(tmp_path, 'admin_roles = ["gestor"]')
    assert verifier.verify_token(hs(claims(role="gestor"))).can_restore
    assert refused(verifier, f"Bearer {hs(claims(role='admin'))}").status == 403


# -- JWKS: a real HTTP server ---------------------------------------------------------------------

def jwk(private: Any, kid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    return {**data, "kid": kid, "alg": "RS256", "use": "sig"}


def serve_jwks(httpserver: HTTPServer, *keys: dict[str, Any]) -> None:
    httpserver.clear()
    httpserver.expect_request("/jwks.json").respond_with_json({"keys": list(keys)})


def jwks_verifier(tmp_path: Path, httpserver: HTTPServer, cooldown: float) -> Verifier:
    config = make_config(tmp_path, f'algorithms = ["RS256"]\n'
                                   f'jwks_url = "{httpserver.url_for("/jwks.json")}"')
    return Verifier(config, jwks_cooldown=cooldown)


def test_jwks_accepts_and_refetches_on_an_unknown_kid(tmp_path: Path, httpserver: HTTPServer,
                                                      rsa_key: rsa.RSAPrivateKey) -> None:
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    serve_jwks(httpserver, jwk(rsa_key, "k1"))
    verifier = jwks_verifier(tmp_path, httpserver, cooldown=0)
    one = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert verifier.verify_token(one).can_admin
    assert verifier.verify_token(one).can_admin
    assert len(httpserver.log) == 1  # cached
    two = jwt.encode(claims(), rotated, algorithm="RS256", headers={"kid": "k2"})
    assert refused(verifier, f"Bearer {two}").code == "unknown_key"
    serve_jwks(httpserver, jwk(rsa_key, "k1"), jwk(rotated, "k2"))  # the app rotated its key
    assert verifier.verify_token(two).can_admin


def test_jwks_unknown_kid_and_forged_tokens_cause_no_fetch_flood(
        tmp_path: Path, httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey) -> None:
    serve_jwks(httpserver, jwk(rsa_key, "k1"))
    verifier = jwks_verifier(tmp_path, httpserver, cooldown=30)
    hs_token = hs(claims(), kid="k1")
    assert refused(verifier, f"Bearer {hs_token}").code == "algorithm_not_allowed"
    assert len(httpserver.log) == 0  # refused before any fetch
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for kid in ("x1", "x2", "x3"):
        token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": kid})
        assert refused(verifier, f"Bearer {token}").code == "unknown_key"
    assert len(httpserver.log) == 1
    # A known kid whose signature was made by another key is still a bad signature.
    forged = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "k1"})
    assert refused(verifier, f"Bearer {forged}").code == "bad_signature"


def test_jwks_unreachable_is_503(tmp_path: Path, httpserver: HTTPServer,
                                 rsa_key: rsa.RSAPrivateKey) -> None:
    config = make_config(tmp_path, f'algorithms = ["RS256"]\njwks_url = '
                                   f'"{httpserver.url_for("/missing.json")}"')
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    error = refused(Verifier(config), f"Bearer {token}")
    assert (error.status, error.code) == (503, "jwks_unreachable")


def test_a_jwks_that_hangs_holds_requests_briefly_and_cached_keys_still_work(
        tmp_path: Path, httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey) -> None:
    """Found by review: with the app's JWKS silent, junk kids queued every request behind
    10 s fetches one after another (health and everything else waited)."""
    serve_jwks(httpserver, jwk(rsa_key, "k1"))
    verifier = jwks_verifier(tmp_path, httpserver, cooldown=0)
    good = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert verifier.verify_token(good).can_admin  # fetched once, cached
    release = threading.Event()

    def silent(request: Any) -> Any:
        release.wait(60)
        return Response("{}", content_type="application/json")
    httpserver.clear()
    httpserver.expect_request("/jwks.json").respond_with_handler(silent)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    codes: list[tuple[int, str]] = []

    def junk(n: int) -> None:
        token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": f"x{n}"})
        error = refused(verifier, f"Bearer {token}")
        codes.append((error.status, error.code))
    try:
        started = time.monotonic()
        threads = [threading.Thread(target=junk, args=(n,)) for n in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # One fetch times out; the others wait for it at most as long, then are refused.
        assert time.monotonic() - started < 4 * JWKS_TIMEOUT + 5
        assert set(codes) == {(503, "jwks_unreachable")}
        quick = time.monotonic()
        assert verifier.verify_token(good).can_admin  # its key is cached: no fetch, no wait
        token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "y"})
        assert refused(verifier, f"Bearer {token}").code == "jwks_unreachable"  # at once
        assert time.monotonic() - quick < 2
    finally:
        release.set()


# -- machine tokens -----------------------------------------------------------------------------

def test_machine_token_is_shown_once_and_stored_as_a_hash(tmp_path: Path) -> None:
    verifier = hs_verifier(tmp_path, 'read_roles = ["monitor"]')
    token = create_machine_token(tmp_path / "state", "nagios", "monitor")
    stored = tmp_path / "state" / TOKENS
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    text = stored.read_text()
    assert token not in text and token[4:] not in text
    assert hashlib.sha256(token.encode()).hexdigest() in text
    principal = verifier.verify_header(f"Bearer {token}")
    assert principal == Principal("token:nagios", "monitor", True, False, False)
    assert refused(verifier, f"Bearer {token[:-1]}x").code == "unknown_token"
    assert create_machine_token(tmp_path / "state", "other", "admin") != token
    revoke_machine_token(tmp_path / "state", "nagios")
    assert refused(verifier, f"Bearer {token}").code == "unknown_token"
    assert verifier.verify_header("Bearer " + create_machine_token(
        tmp_path / "state", "nagios", "monitor")).sub == "token:nagios"  # the name is free


def test_machine_token_names_and_roles_are_checked(tmp_path: Path) -> None:
    config = make_config(tmp_path, f'secret = "{SECRET}"\nread_roles = ["monitor"]')
    token = issue_machine_token(config, "cron-1", "monitor")
    assert find_machine_token(config.state_dir, token) is not None
    with pytest.raises(UsageError, match="exists already"):
        issue_machine_token(config, "cron-1", "monitor")
    with pytest.raises(UsageError, match="none of"):
        issue_machine_token(config, "cron-2", "superuser")
    with pytest.raises(UsageError, match="name"):
        issue_machine_token(config, "../x", "monitor")


def test_machine_token_whose_role_left_the_config_is_403(tmp_path: Path) -> None:
    token = create_machine_token(tmp_path / "state", "old", "monitor")
    assert refused(hs_verifier(tmp_path), f"Bearer {token}").status == 403


def test_insecure_no_auth_on_loopback_lets_every_request_in(tmp_path: Path,
                                                            caplog: Any) -> None:
    verifier = Verifier(make_config(tmp_path, "insecure_no_auth = true"))
    assert "EVERY REQUEST" in caplog.text
    assert verifier.verify_header(None).can_restore


# -- when serve must refuse to start --------------------------------------------------------------

def startup_error(config: Config, listen: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        verify_startup(config, listen)
    if listen is None:  # the Verifier refuses what serve refuses
        with pytest.raises(ConfigError):
            Verifier(config)
    assert SECRET not in str(info.value)
    return str(info.value)


def test_no_server_section_refuses_to_start(tmp_path: Path) -> None:
    config = make_config(tmp_path, f'secret = "{SECRET}"').model_copy(update={"server": None})
    assert "[server]" in startup_error(config)


def test_empty_or_unreadable_secret_file_refuses_to_start(tmp_path: Path) -> None:
    secret = tmp_path / "jwt.secret"
    config = make_config(tmp_path, f'secret_file = "{secret}"')
    assert "secret_file" in startup_error(config)
    secret.write_text("\n")
    assert "empty" in startup_error(config)


def test_bad_public_key_file_refuses_to_start(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "key.pem"
    path.write_text("not a key")
    config = make_config(tmp_path, f'algorithms = ["ES256"]\npublic_key_file = "{path}"')
    assert "not a PEM public key" in startup_error(config)
    path.write_bytes(pem(rsa_key.public_key()))
    assert "fits none of algorithms" in startup_error(config)


def test_listen_override_is_checked_at_start(tmp_path: Path) -> None:
    config = make_config(tmp_path, f'secret = "{SECRET}"')
    verify_startup(config)
    verify_startup(config, "[::1]:9000")
    assert "allow_plain_http" in startup_error(config, "0.0.0.0:8765")
    insecure = make_config(tmp_path, "insecure_no_auth = true")
    assert "insecure_no_auth" in startup_error(insecure, "192.0.2.10:8765")


def test_machine_tokens_made_at_once_are_all_kept(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    state = tmp_path / "state"
    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(lambda i: create_machine_token(state, f"t{i}", "admin"),
                               range(24)))
    assert {find_machine_token(state, t).name for t in tokens} \
        == {f"t{i}" for i in range(24)}  # type: ignore[union-attr]
