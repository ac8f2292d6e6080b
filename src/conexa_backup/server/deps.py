"""What routes declare to get the services, the caller and a checked backup id.

The caller's token is checked before the route's body runs (a refused request does no
work); the route then calls one action and renders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPBearer

from conexa_backup.manifest import ID_PATTERN
from conexa_backup.server import trail
from conexa_backup.server.auth import Principal
from conexa_backup.server.errors import ApiError
from conexa_backup.server.services import Services
from conexa_backup.server.tokens import PREFIX

# Declared for the OpenAPI schema only ("Authorization: Bearer"); the header is read and
# judged by auth.Verifier, which knows every refusal's code.
_bearer = HTTPBearer(auto_error=False, description="The app's JWT, or a machine token (cxb_…)")


def services(request: Request) -> Services:
    """The server's :class:`Services`."""
    found: Services = request.app.state.services
    return found


def _caller(capability: Literal["read", "admin", "restore"]) -> Callable[..., Principal]:
    def dependency(request: Request, _: Annotated[object, Depends(_bearer)] = None) -> Principal:
        """Raises AuthError (401/403/503). Marks the request for the audit log first
        (:mod:`server.trail`), so a refused one is recorded too."""
        header = request.headers.get("authorization")
        token = (header or "").strip().partition(" ")[2].strip()
        found = trail.mark(request.scope, machine_token=token.startswith(PREFIX))
        principal = services(request).verifier.verify_header(header)
        request.state.principal = principal
        if found is not None:
            found.sub = principal.sub
        principal.require(capability)
        return principal
    return dependency


ServicesDep = Annotated[Services, Depends(services)]
Reader = Annotated[Principal, Depends(_caller("read"))]  # list, status
Admin = Annotated[Principal, Depends(_caller("admin"))]  # trigger, download, cancel
Restorer = Annotated[Principal, Depends(_caller("restore"))]  # restore, delete


def backup_id(value: str) -> str:
    """``value`` if it is a backup id (``20261205T030000Z``, ``-N`` suffix allowed).

    Raises:
        ApiError: 422 ``bad_backup_id`` (``..``, ``%2e%2e``, NUL, overlong: never a path).
    """
    if len(value) > 64 or not ID_PATTERN.fullmatch(value):
        raise ApiError(422, "bad_backup_id", f"not a backup id: {value[:64]!r}")
    return value


def audit(request: Request, action: str, outcome: str, backup_id: str | None = None,
          **detail: object) -> None:
    """Record this request's outcome in the audit log now, with ``detail`` (its caller, if
    known); only the first record of a request counts (see :func:`audit_follow_up`).
    Without it, an audited route's outcome is recorded from its answer
    (:mod:`server.trail`); a changing action that was carried out or failed is also told to
    the notifiers (an ``admin`` event)."""
    trail.record(services(request), request.scope, outcome, action=action,
                 backup_id=backup_id, detail=detail)


def audit_follow_up(request: Request, action: str, outcome: str, backup_id: str | None,
                    **detail: object) -> None:
    """A second audit line for what happened after the request's first was written: a
    download that started (``ok``), then was aborted (``failed: damaged``)."""
    trail.record(services(request), request.scope, outcome, action=action,
                 backup_id=backup_id, follow_up=True, detail=detail)
