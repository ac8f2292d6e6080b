"""Who is calling: bearer tokens (the app's JWTs, or machine tokens) to a :class:`Principal`.

No web framework here: routes pass the ``Authorization`` header's value to
:meth:`Verifier.verify_header` and turn an :class:`AuthError` into its status and JSON.

Fail closed: algorithms come from the config, never from the token (``alg: none`` and an HMAC
token signed with a public key are refused); ``exp`` is required, ``nbf``/``iat`` honoured
with 30 s leeway, ``iss``/``aud`` required and checked when configured; a token without a
role the config knows grants nothing (403).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conexa_backup.config.models import Config
from conexa_backup.config.server import (
    HMAC_ALGORITHMS,
    ServerAuthConfig,
    ServerConfig,
    listen_problem,
)
from conexa_backup.errors import ConexaError, ConfigError
from conexa_backup.logs import LOGGER
from conexa_backup.server.tokens import PREFIX, find_machine_token

LEEWAY = 30  # seconds of clock skew tolerated between the app and this host
JWKS_LIFESPAN = 300  # seconds a fetched JWKS is trusted before it is fetched again
JWKS_TIMEOUT = 5  # seconds for one JWKS fetch, and the longest a request waits for one
JWKS_DOWN_FOR = 5.0  # seconds requests are refused at once after a failed fetch
_FAMILIES: dict[str, tuple[type[Any], ...]] = {
    "RS": (rsa.RSAPublicKey,), "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_log = logging.getLogger(LOGGER)


class AuthError(ConexaError):
    """A request refused: ``status`` 401 (no valid token), 403 (a valid token whose role may
    not do this) or 503 (the JWKS could not be fetched); ``code`` is stable for clients.
    The message never holds the token."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Principal:
    """The caller: subject (for the audit log), its most powerful role, and what it may do."""

    sub: str
    role: str
    can_read: bool  # list, status
    can_admin: bool  # trigger, download, cancel
    can_restore: bool  # restore, delete

    def require(self, capability: Literal["read", "admin", "restore"]) -> None:
        """Raises AuthError(403) unless the principal has ``capability`` (read, admin,
        restore)."""
        if not getattr(self, f"can_{capability}"):
            raise AuthError(403, "forbidden", f"role {self.role!r} may not {capability}")


def _server(config: Config) -> ServerConfig:
    if config.server is None:
        raise ConfigError("no [server] section: `serve` needs [server.auth] (see docs/server.md)")
    return config.server


def _read_secret(auth: ServerAuthConfig) -> bytes:
    if auth.secret is not None:
        secret = auth.secret.get_secret_value().encode()
    else:
        assert auth.secret_file is not None  # the config insists on one of them
        try:
            secret = auth.secret_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"server.auth.secret_file: cannot read "
                              f"{auth.secret_file}: {exc.strerror}") from None
    if not secret.strip():
        raise ConfigError("server.auth.secret: is empty: every token would be refused")
    return secret


def _read_public_key(path: Path) -> Any:
    try:
        key = load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"server.auth.public_key_file: cannot read {path}: "
                          f"{exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"server.auth.public_key_file: {path} is not a PEM public "
                          f"key") from None
    return key


def algorithms_for(key: Any, algorithms: Iterable[str]) -> list[str]:
    """The configured ``algorithms`` that ``key`` (a public key object) can verify: an RSA
    key never checks an ES256 token, whatever the token's header says."""
    return [a for a in algorithms
            if a[:2] in _FAMILIES and isinstance(key, _FAMILIES[a[:2]])]


def verify_startup(config: Config, listen: str | None = None) -> None:
    """Raises ConfigError when ``serve`` must refuse to start: no ``[server]``, a ``listen``
    (``serve --listen`` overrides the config's) that the config's exposure rules refuse, or a
    secret or key that cannot be read, is empty, or fits none of the algorithms."""
    server = _server(config)
    problem = listen_problem(server, listen or server.listen)
    if problem:
        raise ConfigError(f"server.{problem}")
    auth = server.auth
    if auth.insecure_no_auth:
        return
    if auth.algorithms[0] in HMAC_ALGORITHMS:
        _read_secret(auth)
    elif auth.public_key_file is not None:
        key = _read_public_key(auth.public_key_file)
        if not algorithms_for(key, auth.algorithms):
            raise ConfigError(f"server.auth.public_key_file: a {type(key).__name__} fits none "
                              f"of algorithms {auth.algorithms}")


_REFUSALS: list[tuple[type[Exception], str, str]] = [
    (jwt.ExpiredSignatureError, "token_expired", "the token has expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid", "the token is not valid yet"),
    (jwt.InvalidIssuerError, "wrong_issuer", "the token's issuer is not the configured one"),
    (jwt.InvalidAudienceError, "wrong_audience", "the token's audience is not the configured "
                                                 "one (or audience is not configured)"),
    (jwt.MissingRequiredClaimError, "missing_claim", "the token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "algorithm_not_allowed", "the token's algorithm is not one "
                                                         "of the configured algorithms"),
    (jwt.InvalidSignatureError, "bad_signature", "the token's signature does not verify"),
    (jwt.DecodeError, "malformed_token", "the token is not a well-formed JWT"),
    (jwt.PyJWTError, "invalid_token", "the token is not valid"),
]


class Verifier:
    """Checks bearer tokens against ``[server.auth]`` and the machine tokens in ``state_dir``.

    Thread-safe (the JWKS client locks its cache); build one per server.
    """

    def __init__(self, config: Config, *, jwks_cooldown: float = 30.0) -> None:
        """Raises ConfigError as :func:`verify_startup` does. ``jwks_cooldown``: least seconds
        between two JWKS refetches caused by unknown ``kid``s (a flood of made-up kids must
        not become a flood of requests to the app)."""
        verify_startup(config, "127.0.0.1:0")  # the listen address is serve's business
        self.auth = _server(config).auth
        self.state_dir = config.state_dir
        self._secret: bytes | None = None
        self._key: Any = None
        self._jwks: jwt.PyJWKClient | None = None
        if self.auth.insecure_no_auth:
            _log.warning("server.auth.insecure_no_auth = true: EVERY REQUEST IS TREATED AS AN "
                         "ADMIN, with no token checked")
        elif self.auth.algorithms[0] in HMAC_ALGORITHMS:
            self._secret = _read_secret(self.auth)
            if len(self._secret) < 32:  # RFC 7518 3.2; the app's secret is not ours to refuse
                _log.warning("server.auth secret is %d bytes; HS256 wants at least 32",
                             len(self._secret))
        elif self.auth.public_key_file is not None:
            self._key = _read_public_key(self.auth.public_key_file)
        else:
            assert self.auth.jwks_url is not None  # the config insists on a key source
            self._jwks = jwt.PyJWKClient(self.auth.jwks_url, lifespan=JWKS_LIFESPAN,
                                         timeout=JWKS_TIMEOUT,
                                         cooldown_duration=jwks_cooldown)
        self._jwks_gate = threading.Lock()  # one fetch at a time, waited for briefly
        self._jwks_down_until = 0.0  # monotonic: a failed fetch is not retried before

    def verify_header(self, header: str | None) -> Principal:
        """The caller named by an ``Authorization`` header value (``Bearer <token>``).

        Raises:
            AuthError: 401 without a valid token, 403 when its role grants nothing, 503 when
                the JWKS cannot be fetched.
        """
        if self.auth.insecure_no_auth:
            return Principal("insecure-no-auth", "insecure-no-auth", True, True, True)
        if not header:
            raise AuthError(401, "missing_token", "an Authorization: Bearer token is required")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "bad_scheme", "the Authorization header must be 'Bearer "
                                               "<token>'")
        return self.verify_token(token.strip())

    def verify_token(self, token: str) -> Principal:
        """The caller a bare token names; raises AuthError as :meth:`verify_header`."""
        if self.auth.insecure_no_auth:
            return Principal("insecure-no-auth", "insecure-no-auth", True, True, True)
        if token.startswith(PREFIX):
            found = find_machine_token(self.state_dir, token)
            if found is None:
                raise AuthError(401, "unknown_token", "no such machine token (revoked?)")
            return self._principal(f"token:{found.name}", [found.role])
        claims = self._decode(token)
        sub = claims.get("sub") or claims.get("email") or "?"
        roles = claims.get(self.auth.role_claim)
        if isinstance(roles, str):
            roles = [roles]
        if not isinstance(roles, list) or not roles or \
                not all(isinstance(r, str) for r in roles):
            raise AuthError(403, "no_role", f"the token has no {self.auth.role_claim!r} claim "
                                            f"(a string or a list of strings)")
        return self._principal(str(sub), roles)

    def _principal(self, sub: str, roles: list[str]) -> Principal:
        """What ``roles`` grant; a restore role is an admin who may also restore."""
        auth = self.auth
        restore = [r for r in roles if r in auth.restore_roles]
        admin = [r for r in roles if r in auth.admin_roles] + restore
        read = [r for r in roles if r in auth.read_roles] + admin
        if not read:
            raise AuthError(403, "forbidden_role", "the token's role may do nothing here")
        return Principal(sub, (restore or admin or read)[0], True, bool(admin), bool(restore))

    def _decode(self, token: str) -> dict[str, Any]:
        """The verified claims of a JWT; raises AuthError(401|503)."""
        auth = self.auth
        required = ["exp"] + (["iss"] if auth.issuer else []) + (["aud"] if auth.audience else [])
        try:
            key, algorithms = self._key_for(token)
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=algorithms, issuer=auth.issuer, audience=auth.audience,
                leeway=LEEWAY, options={"require": required, "verify_signature": True})
        except jwt.PyJWKClientConnectionError:
            raise AuthError(503, "jwks_unreachable", "the JWKS could not be fetched") from None
        except jwt.PyJWKClientError:
            raise AuthError(401, "unknown_key", "the token's kid is not in the JWKS") from None
        except jwt.PyJWTError as exc:
            for kind, code, message in _REFUSALS:
                if isinstance(exc, kind):
                    raise AuthError(401, code, message) from None
            raise  # unreachable: PyJWTError is the last entry
        return claims

    def _jwks_key(self, token: str) -> Any:
        """The JWKS key for ``token``'s kid, fetched if need be; raises PyJWKClientError.

        An app whose JWKS stops answering must not hold every worker thread: a request waits
        at most :data:`JWKS_TIMEOUT` for a fetch under way, and for :data:`JWKS_DOWN_FOR`
        after a failed one, requests are refused (503) at once instead of fetching again.
        """
        assert self._jwks is not None
        cached = self._cached_key(token)
        if cached is not None:  # no fetch needed: never waits, never refused for a down JWKS
            return cached
        if time.monotonic() < self._jwks_down_until:
            raise jwt.PyJWKClientConnectionError("the JWKS was unreachable moments ago")
        if not self._jwks_gate.acquire(timeout=JWKS_TIMEOUT):
            raise jwt.PyJWKClientConnectionError("a JWKS fetch is taking too long")
        try:
            return self._jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWKClientConnectionError:
            self._jwks_down_until = time.monotonic() + JWKS_DOWN_FOR
            raise
        finally:
            self._jwks_gate.release()

    def _cached_key(self, token: str) -> Any:
        """The key for ``token``'s kid from the JWKS fetched within its lifespan, or None."""
        assert self._jwks is not None
        kid = jwt.get_unverified_header(token).get("kid")
        cache = self._jwks.jwk_set_cache
        found = cache.get() if cache is not None and kid else None
        for key in found.keys if found is not None else []:
            if key.key_id == kid and key.public_key_use in ("sig", None):
                return key.key
        return None

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key and the algorithms it may check ``token`` with (never the token's say)."""
        if self._secret is not None:
            return self._secret, list(self.auth.algorithms)
        if self._jwks is not None:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in self.auth.algorithms:
                # Refused before any fetch: junk must not make us call the app's JWKS.
                raise jwt.InvalidAlgorithmError("algorithm not allowed")
            key = self._jwks_key(token)
        else:
            key = self._key
        allowed = algorithms_for(key, self.auth.algorithms)
        if not allowed:
            raise jwt.InvalidKeyError("the key fits none of the configured algorithms")
        return key, allowed
