"""``GET /api/admin/backups/{id}/download`` (to be built)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from conexa_backup.server.deps import Admin, ServicesDep, backup_id
from conexa_backup.server.errors import ApiError

router = APIRouter(prefix="/api/admin", tags=["backups"])


@router.get("/backups/{id}/download")
def download(id: str, request: Request, services: ServicesDep, principal: Admin,
             artifact: str | None = None, target: str | None = None) -> Any:
    """One stored file of a backup (``artifact``), or the list of its artifacts."""
    backup_id(id)
    raise ApiError(501, "not_implemented", "download is not built yet")
