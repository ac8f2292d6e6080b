"""The status page (issue 16): ``GET /`` (the page, no facts, no token), ``GET /page.js`` (its
script, shipped in the package) and ``GET /api/admin/page`` (the facts as HTML, for a token
that may read). Rendering is :mod:`conexa_backup.statuspage`'s; the facts come from the list
snapshot every list and status request is answered from, and from ``state_dir``.

Both documents are sent with a Content-Security-Policy that allows this server alone (no
CDN, nothing inline that runs), and are never cached: the facts change, and a token-bearing
answer must not stay on disk.
"""

from __future__ import annotations

import importlib.resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from conexa_backup.actions.history import history
from conexa_backup.durations import parse_duration
from conexa_backup.server.deps import Reader, ServicesDep
from conexa_backup.server.listing import list_answer, status_answer
from conexa_backup.server.services import Services
from conexa_backup.state import drills, runs
from conexa_backup.statuspage import PERIODS, Facts, choose_lang, shell, view

router = APIRouter(tags=["page"])
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src "
                               "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; "
                               "form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_SCRIPT = (importlib.resources.files("conexa_backup") / "server" / "static" / "page.js")


@router.get("/", response_class=Response, include_in_schema=False)
def page(request: Request, lang: str | None = None) -> Response:
    """The status page, in the language ``Accept-Language`` (or ``?lang=en|pt``) asks for."""
    chosen = choose_lang(request.headers.get("accept-language"), lang)
    return Response(shell(chosen), media_type="text/html; charset=utf-8",
                    headers={**HEADERS, "Content-Language": chosen})


@router.get("/page.js", response_class=Response, include_in_schema=False)
def script() -> Response:
    """The page's script."""
    return Response(_SCRIPT.read_bytes(), media_type="text/javascript; charset=utf-8",
                    headers=HEADERS)


@router.get("/api/admin/page", response_class=Response)
def facts(request: Request, services: ServicesDep, principal: Reader,
          days: Annotated[int, Query(ge=1, le=max(PERIODS))] = PERIODS[0],
          lang: str | None = None) -> Response:
    """Every fact the status page shows, as an HTML fragment: the overall state, each
    target, the backups of the last ``days`` days, the charts. Action buttons only for a
    role that may use them.

    Raises: 503 ``target_unreachable`` when no target could be listed (as the list).
    """
    chosen = choose_lang(request.headers.get("accept-language"), lang)
    found = gather(services, days, can_admin=principal.can_admin,
                   can_restore=principal.can_restore)
    return Response(view(found, chosen), media_type="text/html; charset=utf-8",
                    headers={**HEADERS, "Content-Language": chosen})


def gather(services: Services, days: int, *, can_admin: bool, can_restore: bool) -> Facts:
    """The page's facts from the list snapshot (no scan of its own) and ``state_dir``.

    Raises:
        ApiError: 503 when no target could be listed.
    """
    snap = services.listing.get()
    snap.check()
    running = next((j for j in services.jobs.list() if j.active), None)
    status = status_answer(services.listing, running)
    config = services.config
    made, drilled = runs(config.state_dir), drills(config.state_dir)  # read once, used twice
    return Facts(
        status=status, backups=list_answer(snap)["backups"],
        targets=[t.name for t in config.targets], drills=drilled,
        history=history(services.context(), days, catalog=snap.backups,
                        recorded=(made, drilled)), days=days,
        max_backup_age_seconds=parse_duration(config.monitoring.max_backup_age).total_seconds(),
        not_sent=_not_sent(made),
        can_admin=can_admin, can_restore=can_restore)


def _not_sent(recorded: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """backup id -> target -> why its run did not send it there (its retention skipped it)."""
    found: dict[str, dict[str, str]] = {}
    for r in recorded:
        skipped = (r.get("details") or {}).get("skipped_targets")
        if r.get("backup_id") and isinstance(skipped, dict) and skipped:
            found[str(r["backup_id"])] = {str(k): str(v) for k, v in skipped.items()}
    return found
