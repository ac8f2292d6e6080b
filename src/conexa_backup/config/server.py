"""``[server]`` and ``[server.auth]``: what ``conexa-backup serve`` (the HTTP API) may do.

The checks here are the static ones and fail closed: a listen address others can reach
without TLS, a token algorithm without its key, HMAC and public-key algorithms mixed in one
list (key confusion), or "auth off" anywhere but on loopback, make the file invalid. What needs
files (a secret file that is empty, a key that does not parse) is checked when the server
starts: :func:`conexa_backup.server.auth.verify_startup`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA")
Algorithm = Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
                    "PS512", "ES256", "ES384", "ES512", "EdDSA"]
DEFAULT_LISTEN = "127.0.0.1:8765"


def _hs256() -> list[Algorithm]:
    return ["HS256"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose text is ``message`` as written (no "Value error, ")."""
    return PydanticCustomError("server_config", message)


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port).

    Raises:
        ValueError: not HOST:PORT with a port in 0..65535.
    """
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8765")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); never for a name
    that would need DNS."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerAuthConfig(_Model):
    """``[server.auth]``: which bearer tokens the API accepts, and what each role may do."""

    algorithms: list[Algorithm] = Field(default_factory=_hs256, min_length=1)
    secret: SecretStr | None = None  # HS*: e.g. "${CONEXA_JWT_SECRET}"
    secret_file: Path | None = None
    public_key_file: Path | None = None  # RS*/PS*/ES*/EdDSA: a PEM public key
    jwks_url: str | None = None  # ... or the app's JWKS (cached, refetched on an unknown kid)
    issuer: str | None = None  # checked (and required in tokens) when set
    audience: str | None = None
    role_claim: str = Field(default="role", min_length=1)
    admin_roles: list[str] = Field(default_factory=lambda: ["admin"])
    read_roles: list[str] = Field(default_factory=list)  # list and status only
    restore_roles: list[str]  # restore and delete; default: admin_roles
    insecure_no_auth: bool = False  # loopback only: every request is an admin

    @model_validator(mode="before")
    @classmethod
    def _restore_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "restore_roles" not in data:
            data = {**data, "restore_roles": data.get("admin_roles", ["admin"])}
        return data

    @field_validator("admin_roles", "read_roles", "restore_roles")
    @classmethod
    def _roles(cls, value: list[str]) -> list[str]:
        if any(not role.strip() for role in value):
            raise _invalid("a role must not be empty")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_https(cls, value: str | None) -> str | None:
        # Keys fetched over plain HTTP could be swapped by anyone on the path: forged tokens.
        if value is not None:
            parts = urlsplit(value)
            if not (parts.scheme == "https" or (parts.scheme == "http"
                                                and is_loopback(parts.hostname or ""))):
                raise _invalid("must be an https:// URL (http:// only on loopback)")
        return value

    @model_validator(mode="after")
    def _keys_match_algorithms(self) -> ServerAuthConfig:
        if self.insecure_no_auth:
            return self
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        public = [a for a in self.algorithms if a not in HMAC_ALGORITHMS]
        if hmac and public:
            raise _invalid(f"algorithms: {', '.join(hmac)} cannot be listed with "
                           f"{', '.join(public)} (a public key would be accepted as an HMAC "
                           f"secret); use one kind")
        has_secret = self.secret is not None or self.secret_file is not None
        has_key = self.public_key_file is not None or self.jwks_url is not None
        if self.secret is not None and self.secret_file is not None:
            raise _invalid("secret and secret_file: set only one")
        if self.public_key_file is not None and self.jwks_url is not None:
            raise _invalid("public_key_file and jwks_url: set only one")
        if hmac and (has_key or not has_secret):
            raise _invalid(f"secret: {hmac[0]} needs `secret` or `secret_file` "
                           f"(and no public_key_file/jwks_url)")
        if hmac and self.secret is not None and not self.secret.get_secret_value().strip():
            raise _invalid("secret: is empty (an unset ${VAR}?)")
        if public and (has_secret or not has_key):
            raise _invalid(f"public_key_file: {public[0]} needs `public_key_file` or "
                           f"`jwks_url` (and no secret/secret_file)")
        return self


class ServerConfig(_Model):
    """``[server]``: where ``conexa-backup serve`` listens and who may call it."""

    listen: str = DEFAULT_LISTEN  # `serve --listen HOST:PORT` overrides it
    allow_plain_http: bool = False  # needed for a non-loopback listen without TLS
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    cors_origins: list[str] = Field(default_factory=list)
    download: Literal["proxy", "presigned"] = "proxy"
    # Reverse proxies (addresses or networks) whose X-Forwarded-For names the client in the
    # audit log and the request log; none by default: the header is anyone's to forge.
    trusted_proxies: list[str] = Field(default_factory=list)
    auth: ServerAuthConfig

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        for item in value:  # "*" or a name would trust any caller's claim about itself
            try:
                ipaddress.ip_network(item)
            except ValueError:
                raise _invalid(f"trusted_proxies: {item!r} is not an IP address or network "
                               f"(e.g. 127.0.0.1, 10.0.0.0/8)") from None
        return value

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        try:
            split_listen(value)
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _exposure(self) -> ServerConfig:
        problem = listen_problem(self, self.listen)
        if problem:
            raise _invalid(problem)
        return self


def listen_problem(server: ServerConfig, listen: str) -> str | None:
    """Why ``server`` must not listen on ``listen`` (the config's or ``serve --listen``'s),
    or None: TLS half-configured, a reachable address in plain HTTP without
    ``allow_plain_http``, or ``insecure_no_auth`` off loopback."""
    if (server.tls_cert_file is None) != (server.tls_key_file is None):
        return "tls_cert_file and tls_key_file: set both or neither"
    try:
        host, _ = split_listen(listen)
    except ValueError as exc:
        return f"listen: {exc}"
    if is_loopback(host):
        return None
    if server.auth.insecure_no_auth:
        return (f"auth.insecure_no_auth: only allowed with a loopback listen "
                f"(127.0.0.1, ::1, localhost), not {host}")
    if server.tls_cert_file is None and not server.allow_plain_http:
        return (f"listen: {host} is reachable from other hosts: set tls_cert_file and "
                f"tls_key_file, or allow_plain_http = true behind a TLS reverse proxy")
    return None
