"""``DELETE /api/admin/backups/{id}``: delete a backup's copies, except those prune always
keeps (:func:`actions.prune.must_keep`: the newest complete, newest good and newest verified
copy on each target, object-locked copies, unreadable manifests). The API never forces."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from conexa_backup.actions.delete import delete as run_delete
from conexa_backup.server.deps import Restorer, ServicesDep, audit, backup_id
from conexa_backup.server.errors import ApiError

router = APIRouter(prefix="/api/admin", tags=["backups"])


@router.delete("/backups/{id}")
def delete(id: str, request: Request, services: ServicesDep, principal: Restorer,
           target: str | None = None) -> dict[str, Any]:
    """Delete backup ``id`` (or only its copy on ``target``) unless prune would refuse.

    200 ``{"success": true, "backupId", "deleted": [targets], "kept": {target: why},
    "unreachable": {target: error}}``; 404 ``backup_not_found``; 409 ``backup_protected``
    (nothing deleted: every copy is kept, ``kept`` says why) or ``busy`` (a run or a job
    holds the lock: ``holder``, ``since``); 422 ``bad_backup_id``/``bad_request``.
    """
    backup_id(id)
    try:
        with services.jobs.exclusive(f"delete {id} (api)"):
            result = run_delete(services.context(), id, [target] if target else None)
    finally:  # a delete that failed half-way has deleted something too
        services.invalidate()
    if not result.deleted:
        kept = "; ".join(f"{t}: {why}" for t, why in result.kept.items())
        raise ApiError(409, "backup_protected", f"backup {id} is kept: {kept}",
                       kept=result.kept, unreachable=result.unreachable)
    audit(request, "delete", "ok", id, deleted=result.deleted, kept=result.kept)
    return {"success": True, **result.to_dict()}
