"""``POST /api/admin/backups/trigger``, ``POST /api/admin/backups/{id}/restore`` and
``/api/admin/jobs`` (to be built)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from conexa_backup.server.deps import Admin, Restorer, ServicesDep, backup_id
from conexa_backup.server.errors import ApiError

router = APIRouter(prefix="/api/admin", tags=["jobs"])


@router.post("/backups/trigger", status_code=202)
def trigger(request: Request, services: ServicesDep, principal: Admin) -> dict[str, Any]:
    """Start a backup now, as a job."""
    raise ApiError(501, "not_implemented", "trigger is not built yet")


@router.post("/backups/{id}/restore", status_code=202)
def restore(id: str, request: Request, services: ServicesDep,
            principal: Restorer) -> dict[str, Any]:
    """Start a restore of backup ``id``, as a job; the body must confirm the id."""
    backup_id(id)
    raise ApiError(501, "not_implemented", "restore is not built yet")


@router.get("/jobs")
def list_jobs(services: ServicesDep, principal: Admin) -> dict[str, Any]:
    """The jobs, newest first."""
    raise ApiError(501, "not_implemented", "jobs are not built yet")


@router.get("/jobs/{job_id}")
def get_job(job_id: str, services: ServicesDep, principal: Admin) -> dict[str, Any]:
    """One job: state, progress steps, exit code, backup id, timings, error."""
    raise ApiError(501, "not_implemented", "jobs are not built yet")


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, services: ServicesDep,
               principal: Admin) -> dict[str, Any]:
    """Ask a running job to stop."""
    raise ApiError(501, "not_implemented", "cancel is not built yet")
