"""Which requests the audit log records, in one place rather than in every route.

The auth dependency :func:`mark`\\ s a request of an audited route (download, trigger,
restore, delete, cancel; any route called with a machine token) before it checks the token,
so a refusal is recorded too. A route may :func:`record` its own outcome with detail (what
it deleted, the job it started); otherwise :class:`AuditTrail`, an ASGI middleware, records
the answer's outcome as its last bytes go out: ``ok`` below 400, ``refused: <code>`` for
4xx, ``failed: <code>`` for 5xx, ``<code>`` being the JSON answer's ``error``.

Changing actions (trigger, restore, delete, cancel) that were carried out or failed are also
sent to the notifiers as an ``admin`` event, from a thread: a slow notifier never holds up
the answer, and its failure is logged, never answered. Refusals are not sent (anyone can
make a refused request; the audit log has them).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conexa_backup.events import admin_event
from conexa_backup.logs import LOGGER
from conexa_backup.notify.base import Event
from conexa_backup.notify.dispatch import dispatch
from conexa_backup.server.audit import Entry
from conexa_backup.server.errors import audit_outcome
from conexa_backup.server.services import Services

_log = logging.getLogger(LOGGER)

# (method, route path) -> (action, the path parameter naming a backup, one naming a job)
ACTIONS: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    ("GET", "/api/admin/backups/{id}/download"): ("download", "id", None),
    ("POST", "/api/admin/backups/trigger"): ("trigger", None, None),
    ("POST", "/api/admin/backups/{id}/restore"): ("restore", "id", None),
    ("DELETE", "/api/admin/backups/{id}"): ("delete", "id", None),
    ("POST", "/api/admin/jobs/{job_id}/cancel"): ("cancel", None, "job_id"),
}
CHANGES = frozenset({"trigger", "restore", "delete", "cancel"})  # told to the notifiers
_STATE_KEY = "audit_mark"
_MAX_ERROR_BODY = 8192  # an error answer is a small JSON; never hold more than this


@dataclass
class Mark:
    """A request to be audited: its action and what it is about; ``done`` once recorded."""

    action: str
    backup_id: str | None
    client: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    sub: str = "-"  # unknown until the token is checked
    done: bool = False


def mark(scope: Scope, *, machine_token: bool) -> Mark | None:
    """Mark this request for the audit log if its route is audited, or if it carries a
    machine token (action ``token``); returns the mark (None: not audited)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    found = ACTIONS.get((scope.get("method", ""), path or ""))
    params: dict[str, Any] = scope.get("path_params", {})
    client = scope["client"][0] if scope.get("client") else None
    if found is not None:
        action, id_param, job_param = found
        backup = (str(params.get(id_param, ""))[:64] or None) if id_param else None
        detail = {"job": str(params.get(job_param, ""))[:64]} if job_param else {}
        made = Mark(action, backup, client, detail)
    elif machine_token:
        made = Mark("token", None, client, {"route": f"{scope.get('method')} {path}"})
    else:
        return None
    scope.setdefault("state", {})[_STATE_KEY] = made
    return made


def marked(scope: Scope) -> Mark | None:
    """The request's :class:`Mark`, if :func:`mark` made one."""
    state = scope.get("state")
    found = state.get(_STATE_KEY) if isinstance(state, dict) else None
    return found if isinstance(found, Mark) else None


def record(services: Services, scope: Scope, outcome: str, *, action: str | None = None,
           backup_id: str | None = None, follow_up: bool = False,
           detail: Mapping[str, object] | None = None) -> None:
    """Record this request's outcome now (``ok``, ``refused: <code>``, ``failed: <code>``),
    once: the middleware then leaves it alone. ``follow_up``: a second line for what
    happened after the first was written (a download that started, then was aborted).
    Tells the notifiers of a changing action that was carried out or failed. A request no
    route marked is recorded under ``action``."""
    found = marked(scope)
    if found is None:  # a route no one marked, recording itself
        client = scope["client"][0] if scope.get("client") else None
        principal = scope.get("state", {}).get("principal")
        found = Mark(action or "?", backup_id, client, sub=getattr(principal, "sub", "-"))
        scope.setdefault("state", {})[_STATE_KEY] = found
    if found.done and not follow_up:
        return
    found.done = True
    found.action = action or found.action
    found.backup_id = backup_id or found.backup_id
    found.detail |= dict(detail or {})
    services.audit.record(Entry(action=found.action, sub=found.sub, client=found.client,
                                outcome=outcome, backup_id=found.backup_id,
                                detail=found.detail))
    if found.action in CHANGES and not outcome.startswith("refused"):
        _notify(services, admin_event(found.action, found.sub, outcome, found.backup_id,
                                      found.client, **found.detail))


def _notify(services: Services, event: Event) -> None:
    """Send ``event`` from a thread of its own; dispatch logs a notifier's failure."""
    configs = services.config.notify
    if not any(c.wants(event) for c in configs):
        return

    def send() -> None:
        try:
            dispatch(configs, event)
        except Exception:  # a notifier must never take anything down with it
            _log.exception("admin event %r", event.title)

    threading.Thread(target=send, name="admin-event", daemon=True).start()


def outcome(status: int, body: bytes) -> str:
    """``ok``, ``refused: <code>`` or ``failed: <code>`` for an answer's status and body."""
    if status < 400:
        return "ok"
    try:
        code = str(json.loads(body).get("error") or status)
    except (ValueError, AttributeError):
        code = str(status)
    return audit_outcome(status, code)


class AuditTrail:
    """ASGI middleware: records a marked request's outcome as its answer's last bytes go out
    (so a client that has the answer finds the line), or when its route raised (``failed:
    internal``), unless the route recorded it itself."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status, body = 500, bytearray()

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                if status >= 400:
                    body.extend(message.get("body", b"")[:_MAX_ERROR_BODY - len(body)])
                if not message.get("more_body", False):  # recorded before the client has it
                    self._finish(scope, outcome(status, bytes(body)))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            self._finish(scope, "failed: internal")
            raise
        self._finish(scope, outcome(status, bytes(body)))  # no body sent at all

    def _finish(self, scope: Scope, result: str) -> None:
        found = marked(scope)
        if found is not None and not found.done:
            try:
                record(self.services, scope, result)
            except Exception:  # the answer is sent; the audit's failure is only logged
                _log.exception("audit log")
