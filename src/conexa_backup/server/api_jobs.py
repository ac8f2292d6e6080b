"""``POST /api/admin/backups/trigger``, ``POST /api/admin/backups/{id}/restore`` and
``/api/admin/jobs``: backups and restores run as jobs (:mod:`conexa_backup.server.jobs`).

A trigger answers the new backup's id at once: it is chosen here by the backup's own rule
(:func:`actions.backup.next_id`) and handed to the job's CLI (``backup --id``). A restore is
refused before any job starts when the body does not repeat the id, or the backup is unknown.
Trigger, restore and cancel are audited, refusals after the token check included.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from conexa_backup.actions.backup import next_id
from conexa_backup.actions.estimate import restore_estimate, restore_size
from conexa_backup.catalog import Use, resolve
from conexa_backup.errors import ConexaError
from conexa_backup.server.deps import Admin, Restorer, ServicesDep, audit, backup_id
from conexa_backup.server.errors import ApiError, outcome_of
from conexa_backup.server.job import Job, job_answer
from conexa_backup.server.services import Services
from conexa_backup.state import drills

router = APIRouter(prefix="/api/admin", tags=["jobs"])
T = TypeVar("T")
STARTED = "Restauração iniciada"  # the seed's admin panel shows this text as it is


class RestoreBody(BaseModel):
    """What the admin confirmed: ``confirm`` must repeat the backup's id, as typed."""

    model_config = ConfigDict(extra="forbid")
    confirm: str | None = Field(default=None, max_length=200)
    to_database: str | None = Field(default=None, min_length=1, max_length=63,
                                    description="Restore into this new database instead")
    only: Literal["database", "uploads"] | None = None


@router.post("/backups/trigger", status_code=202)
def trigger(request: Request, services: ServicesDep, principal: Admin) -> dict[str, Any]:
    """Start a backup now, as a job; answers its id and the job at once (409 while another
    job runs or a CLI run holds the lock)."""
    when = datetime.now(UTC).replace(microsecond=0)

    def start() -> Job:
        chosen = next_id(services.context(), when)
        return services.jobs.start("backup", {"backup_id": chosen}, principal.sub)

    job = _audited(request, "trigger", None, start)
    audit(request, "trigger", "ok", job.backup_id, job_id=job.id)
    return {"success": True, "backupId": job.backup_id,
            "timestamp": when.isoformat().replace("+00:00", "Z"), "jobId": job.id,
            "job": job_answer(job, services.redact)}


@router.post("/backups/{id}/restore", status_code=202)
def restore(id: str, request: Request, services: ServicesDep, principal: Restorer,
            body: Annotated[RestoreBody | None, Body()] = None) -> dict[str, Any]:
    """Start a restore of backup ``id`` (taking a safety backup of what it replaces), as a
    job; ``confirm`` must repeat the id. Answers the job and the estimated duration."""
    body = body or RestoreBody()

    def start() -> tuple[Job, dict[str, Any]]:
        checked = backup_id(id)
        if body.confirm != checked:
            raise ApiError(422, "confirm_mismatch",
                           "confirm must repeat the backup id to restore, exactly")
        estimate = _estimate(services, checked, body.only)
        args = {"backup_id": checked, **body.model_dump(exclude_none=True, exclude={"confirm"})}
        return services.jobs.start("restore", args, principal.sub), estimate

    job, estimate = _audited(request, "restore", id[:64], start)
    audit(request, "restore", "ok", job.backup_id, job_id=job.id)
    return {"success": True, "message": STARTED, "estimatedTime": estimate["text"],
            "estimatedSeconds": estimate["seconds"], "estimateReason": estimate["reason"],
            "estimate": estimate, "jobId": job.id, "backupId": job.backup_id,
            "job": job_answer(job, services.redact)}


@router.get("/jobs")
def list_jobs(services: ServicesDep, principal: Admin,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    """The newest ``limit`` jobs, newest first, without their steps and CLI answer (see
    ``GET /api/admin/jobs/{id}``)."""
    jobs = services.jobs.list()[:limit]
    return {"jobs": [job_answer(j, services.redact, full=False) for j in jobs]}


@router.get("/jobs/{job_id}")
def get_job(job_id: str, services: ServicesDep, principal: Admin) -> dict[str, Any]:
    """One job: state, progress steps, exit code, backup id, timings, error."""
    return job_answer(services.jobs.get(job_id), services.redact)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request, services: ServicesDep,
               principal: Admin) -> dict[str, Any]:
    """Ask a running job to stop: it answers ``cancel_requested`` and becomes ``canceled``
    once its process has cleaned up and ended. A job already over is answered as it is."""
    job = _audited(request, "cancel", None, lambda: services.jobs.cancel(job_id),
                   job_id=job_id[:40])
    audit(request, "cancel", "ok", job.backup_id, job_id=job.id, state=job.state)
    return job_answer(job, services.redact)


def _estimate(services: Services, checked: str, only: str | None) -> dict[str, Any]:
    """The restore's estimate; raises BackupNotFoundError (404) or the catalog's refusals
    (no complete copy: 422; every copy damaged: 409) before any job starts."""
    ctx = services.context()
    backups = ctx.scan(ctx.targets(), unreachable={})
    found = resolve(backups, checked, use=Use.DATABASE if only == "database" else Use.RESTORE)
    assert found.manifest is not None  # resolve answers complete backups only
    sizes = {b.id: b.manifest.size_bytes for b in backups if b.manifest is not None}
    estimate = restore_estimate(drills(services.config.state_dir),
                                restore_size(found.manifest, only), sizes)
    return {**estimate.to_json()}


def _audited(request: Request, action: str, backup: str | None, run: Callable[[], T],
             **detail: object) -> T:
    """``run()``; a refusal (any ConexaError) is audited with its code, then re-raised."""
    try:
        return run()
    except ConexaError as exc:
        audit(request, action, outcome_of(exc), backup, **detail)
        raise
