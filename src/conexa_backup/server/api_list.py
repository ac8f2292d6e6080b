"""``GET /api/admin/backups`` and ``GET /api/admin/backups/status`` (to be built)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from conexa_backup.server.deps import Reader, ServicesDep
from conexa_backup.server.errors import ApiError

router = APIRouter(prefix="/api/admin", tags=["backups"])


@router.get("/backups")
def list_backups(services: ServicesDep, principal: Reader) -> dict[str, Any]:
    """Every complete backup, newest first, as the seed lists them plus per-copy detail."""
    raise ApiError(501, "not_implemented", "list is not built yet")


@router.get("/backups/status")
def backups_status(services: ServicesDep, principal: Reader) -> dict[str, Any]:
    """``status --json`` plus the running job, if any."""
    raise ApiError(501, "not_implemented", "status is not built yet")
