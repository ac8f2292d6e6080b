"""``GET /api/admin/backups`` and ``GET /api/admin/backups/status``: answered from the list
cache (:mod:`server.listing`), never from a scan of their own."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from conexa_backup.errors import UsageError
from conexa_backup.server.deps import Reader, ServicesDep
from conexa_backup.server.errors import ApiError
from conexa_backup.server.listing import status_answer

router = APIRouter(prefix="/api/admin", tags=["backups"])


@router.get("/backups", response_class=Response, responses={200: {
    "content": {"application/json": {}},
    "description": '{"backups": [{"id", "date", "size", "status", "location", ...}], '
                   '"incomplete", "unreachable", "listed_at"}'}})
def list_backups(services: ServicesDep, principal: Reader,
                 target: str | None = None) -> Response:
    """Every backup with a complete (or damaged) copy, newest first, as the seed lists them
    plus per-copy detail; ``?target=NAME``: only that target's copies.

    Raises: UsageError (422): an unknown target; 503 ``target_unreachable``: no target (or
    not ``target``) could be listed.
    """
    if target is not None and target not in services.listing.targets():
        raise UsageError(f"unknown target {target[:80]!r}; configured: "
                         + ", ".join(services.listing.targets()))
    snap = services.listing.get()
    if target is not None and target in snap.unreachable:
        raise ApiError(503, "target_unreachable", snap.unreachable[target])
    return Response(snap.answer(target), media_type="application/json")


@router.get("/backups/status")
def backups_status(services: ServicesDep, principal: Reader) -> dict[str, Any]:
    """``status --json`` plus the running job, if any, and the newest backup as listed."""
    running = next((j for j in services.jobs.list() if j.active), None)
    return status_answer(services.listing, running)
