"""``DELETE /api/admin/backups/{id}`` (to be built)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from conexa_backup.server.deps import Restorer, ServicesDep, backup_id
from conexa_backup.server.errors import ApiError

router = APIRouter(prefix="/api/admin", tags=["backups"])


@router.delete("/backups/{id}")
def delete(id: str, request: Request, services: ServicesDep, principal: Restorer,
           target: str | None = None) -> dict[str, Any]:
    """Delete backup ``id`` (or only its copy on ``target``) unless prune would refuse."""
    backup_id(id)
    raise ApiError(501, "not_implemented", "delete is not built yet")
