"""Machine tokens for scripts: random bearer tokens kept in ``state_dir/server-tokens.json``.

A token is shown once, when it is made; the file keeps only its SHA-256 with its name, role
and creation time (0600, replaced atomically under the state lock), so reading the file
gives nobody a token. No web or JWT imports: ``serve token create`` works without them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from conexa_backup.config.models import Config
from conexa_backup.errors import ConfigError, UsageError
from conexa_backup.state import _locked, _read, private_dir, write_json

TOKENS = "server-tokens.json"
# Tells a machine token from a JWT (which always holds two dots) and lets secret scanners
# recognise a leaked one.
PREFIX = "cxb_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class MachineToken:
    """A stored token, without the token."""

    name: str
    role: str
    created: str  # ISO time


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _entries(state_dir: Path) -> list[dict[str, str]]:
    found = _read(state_dir / TOKENS).get("tokens", [])
    return [e for e in found if isinstance(e, dict)
            and all(isinstance(e.get(k), str) for k in ("name", "role", "sha256", "created"))]


def create_machine_token(state_dir: Path, name: str, role: str) -> str:
    """Make a token called ``name`` acting with ``role``; store its hash; return the token
    (the only time it exists in clear).

    Raises:
        UsageError: a bad or already used name, or an empty role.
        OSError: ``state_dir`` cannot be created or written.
    """
    if not _NAME.fullmatch(name):
        raise UsageError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if not role.strip():
        raise UsageError("token role must not be empty")
    private_dir(state_dir)
    token = PREFIX + secrets.token_urlsafe(32)
    with _locked(state_dir):
        entries = _entries(state_dir)
        if any(e["name"] == name for e in entries):
            raise UsageError(f"a token named {name!r} exists already")
        created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        entries.append({"name": name, "role": role, "sha256": _digest(token),
                        "created": created})
        write_json(state_dir / TOKENS, {"tokens": entries})
    return token


def find_machine_token(state_dir: Path, token: str) -> MachineToken | None:
    """The stored token whose hash is ``token``'s, or None. Every entry is compared in
    constant time, so timing tells nothing about how close a guess came."""
    digest = _digest(token)
    match = None
    for entry in _entries(state_dir):
        if hmac.compare_digest(entry["sha256"], digest):
            match = MachineToken(entry["name"], entry["role"], entry["created"])
    return match


def machine_tokens(state_dir: Path) -> list[MachineToken]:
    """The stored tokens (names, roles, creation times), oldest first."""
    return [MachineToken(e["name"], e["role"], e["created"]) for e in _entries(state_dir)]


def issue_machine_token(config: Config, name: str, role: str) -> str:
    """``serve token create``: :func:`create_machine_token` for a role ``[server.auth]``
    knows (a token whose role grants nothing would be refused on every request).

    Raises:
        ConfigError: the config has no ``[server]`` section.
        UsageError: an unknown role, a bad or already used name.
    """
    if config.server is None:
        raise ConfigError("no [server] section: machine tokens are for `serve`")
    auth = config.server.auth
    known = {*auth.read_roles, *auth.admin_roles, *auth.restore_roles}
    if role not in known:
        raise UsageError(f"role {role!r} is in none of server.auth's read_roles, admin_roles "
                         f"or restore_roles ({', '.join(sorted(known)) or 'none'})")
    return create_machine_token(config.state_dir, name, role)


def revoke_machine_token(state_dir: Path, name: str) -> None:
    """Forget the token called ``name``: requests bearing it are refused from now on.

    Raises:
        UsageError: no token has that name.
    """
    with _locked(private_dir(state_dir)):
        entries = _entries(state_dir)
        kept = [e for e in entries if e["name"] != name]
        if len(kept) == len(entries):
            raise UsageError(f"no machine token named {name!r}")
        write_json(state_dir / TOKENS, {"tokens": kept})
