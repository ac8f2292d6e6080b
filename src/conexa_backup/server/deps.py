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
from conexa_backup.server.audit import Entry
from conexa_backup.server.auth import Principal
from conexa_backup.server.errors import ApiError
from conexa_backup.server.services import Services

# Declared for the OpenAPI schema only ("Authorization: Bearer"); the header is read and
# judged by auth.Verifier, which knows every refusal's code.
_bearer = HTTPBearer(auto_error=False, description="The app's JWT, or a machine token (cxb_…)")


def services(request: Request) -> Services:
    """The server's :class:`Services`."""
    found: Services = request.app.state.services
    return found


def _caller(capability: Literal["read", "admin", "restore"]) -> Callable[..., Principal]:
    def dependency(request: Request, _: Annotated[object, Depends(_bearer)] = None) -> Principal:
        """Raises AuthError (401/403/503)."""
        principal = services(request).verifier.verify_header(request.headers.get("authorization"))
        request.state.principal = principal
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
    if len(value) > 64 or not ID_PATTERN.match(value):
        raise ApiError(422, "bad_backup_id", f"not a backup id: {value[:64]!r}")
    return value


def client(request: Request) -> str | None:
    """The client's address: the socket's, or, from a proxy in ``[server]
    trusted_proxies``, the one its X-Forwarded-For names (uvicorn rewrites it)."""
    return request.client.host if request.client else None


def audit(request: Request, action: str, outcome: str, backup_id: str | None = None,
          **detail: object) -> None:
    """Append one line to the audit log for this request (its caller, if known)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    services(request).audit.record(Entry(
        action=action, sub=principal.sub if principal else "-", client=client(request),
        outcome=outcome, backup_id=backup_id, detail=dict(detail)))
