"""``GET /api/admin/backups/{id}/download``: one stored file of a backup, or their list.

The bytes come from :mod:`actions.download` (which copy, the SHA-256 check as it streams);
this module speaks HTTP: the artifact list, headers, a single byte range (``Range``,
``If-Range``), the 307 to a pre-signed URL, and one audit line per request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import Send

from conexa_backup.actions import download as action
from conexa_backup.catalog import Backup
from conexa_backup.errors import ConexaError
from conexa_backup.logs import LOGGER
from conexa_backup.manifest import MANIFEST_NAME
from conexa_backup.server.deps import Admin, ServicesDep, audit, audit_follow_up, backup_id
from conexa_backup.server.errors import ApiError, answer, outcome_of

router = APIRouter(prefix="/api/admin", tags=["backups"])
_log = logging.getLogger(LOGGER)
TARGET_HEADER = "X-Conexa-Target"  # the target a file was read from (or signed on)
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Unsatisfiable(Exception):
    """The range asks for nothing inside the object (HTTP 416)."""


def byte_range(header: str | None, if_range: str | None, etag: str,
               size: int) -> tuple[int, int] | None:
    """The single range (first, last byte, inclusive) that ``Range`` asks for, or None for
    the whole object: no header, one we ignore as RFC 9110 allows (malformed, several
    ranges, a unit other than bytes), or an ``If-Range`` that is not our ETag.

    Raises:
        Unsatisfiable: a well-formed range that starts past the end (or any on an empty
        object, or ``bytes=-0``).
    """
    found = _RANGE.match(header.replace(" ", "")) if header else None
    if found is None or (if_range is not None and if_range.strip() != etag):
        return None
    start, end = found.groups()
    if not start and not end:
        return None
    if not start:  # the last N bytes
        if int(end) == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - int(end)), size - 1
    first, last = int(start), int(end) if end else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise Unsatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


class CheckedStream(StreamingResponse):
    """A streamed body that is abandoned, not ended, when its iterator raises a
    ConexaError (a SHA-256 or size mismatch, a failed read): the app returns without the
    final body message, so the server closes the connection and the client sees a
    truncated body, never a complete-looking one. ``on_abort`` logs and audits it."""

    def __init__(self, content: Iterator[bytes], on_abort: Callable[[ConexaError], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_abort = on_abort

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except ConexaError as exc:
            self.on_abort(exc)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@router.get("/backups/{id}/download", response_model=None)
def download(id: str, request: Request, services: ServicesDep, principal: Admin,
             artifact: str | None = None, target: str | None = None) -> Response:
    """One stored file of a backup (``artifact``), or the list of its artifacts.

    The file is sent as stored (encrypted ones stay encrypted), from the first good copy or
    the one on ``target``, its SHA-256 checked as it streams: a mismatch drops the
    connection before the last byte. ``Range`` resumes a cut download (206).
    """
    try:
        backup_id(id)
        if artifact is not None and artifact not in action.WORDS:
            raise ApiError(422, "unknown_artifact", f"unknown artifact {artifact[:40]!r}: "
                           f"use one of {', '.join(action.WORDS)}")
        backup = action.find(services.context(), id, target)
        if artifact is None:
            audit(request, "download", "ok", id, artifact=None, target=target and target[:64])
            return JSONResponse(artifact_list(backup, target))
        presign = services.config.server is not None and \
            services.config.server.download == "presigned"
        found = action.open_stored(backup, artifact, target, presign=presign)
    except ConexaError as exc:
        audit(request, "download", outcome_of(exc), id[:64],
              artifact=artifact and artifact[:40], target=target and target[:64])
        raise
    where = {"artifact": artifact, "target": found.copy.target.name}
    if found.url is not None:
        audit(request, "download", "ok: redirected", id, **where)
        return RedirectResponse(found.url, status_code=307,
                                headers={TARGET_HEADER: found.copy.target.name})
    return _send(request, found, where)


def _send(request: Request, found: action.Stored, where: dict[str, Any]) -> Response:
    etag = f'"{found.sha256}"'
    headers = {"Accept-Ranges": "bytes", "ETag": etag, TARGET_HEADER: found.copy.target.name,
               "Content-Disposition": f'attachment; filename="{found.backup_id}-{found.name}"'}
    try:
        chosen = byte_range(request.headers.get("range"), request.headers.get("if-range"),
                            etag, found.size)
    except Unsatisfiable:
        action.close(found)
        audit(request, "download", "refused: range_not_satisfiable", found.backup_id, **where)
        return JSONResponse({"error": "range_not_satisfiable",
                             "message": f"the file has {found.size} bytes"}, status_code=416,
                            headers={**headers, "Content-Range": f"bytes */{found.size}"})
    first, last = chosen if chosen is not None else (0, found.size - 1)
    if chosen is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{found.size}"
    headers["Content-Length"] = str(last - first + 1)

    def aborted(exc: ConexaError) -> None:
        _log.error("download of %s aborted: %s", found.backup_id,
                   request.app.state.services.redact(str(exc)))
        # Failed whatever the code: the answer had started, so it was never a refusal.
        audit_follow_up(request, "download", f"failed: {answer(exc).body['error']}",
                        found.backup_id, **where)

    audit(request, "download", "ok", found.backup_id, **where,
          range=None if chosen is None else f"{first}-{last}")
    media = "application/json" if found.name == MANIFEST_NAME else "application/octet-stream"
    return CheckedStream(action.stream(found, first, last), aborted,
                         status_code=206 if chosen is not None else 200, headers=headers,
                         media_type=media)


def artifact_list(backup: Backup, target: str | None = None) -> dict[str, Any]:
    """What ``download`` without ``artifact`` answers: each file (name, size, SHA-256, its
    URL) and the targets holding a copy (good ones, and those known damaged)."""
    manifest = backup.manifest
    assert manifest is not None  # find() returns complete backups only
    base = f"/api/admin/backups/{backup.id}/download?artifact="
    suffix = f"&target={target}" if target else ""
    files: list[dict[str, Any]] = [
        {"artifact": a.kind, "name": a.name, "size": a.size, "sha256": a.sha256,
         "encryption": a.encryption, "url": f"{base}{a.kind}{suffix}"}
        for a in manifest.artifacts]
    key = f"{backup.id}/{MANIFEST_NAME}"
    listed = next((o for c in backup.complete_copies for o in c.objects if o.key == key), None)
    files.append({"artifact": action.MANIFEST, "name": MANIFEST_NAME,
                  "size": listed.size if listed else None, "sha256": None, "encryption": None,
                  "url": f"{base}{action.MANIFEST}{suffix}"})
    return {"backupId": backup.id, "artifacts": files,
            "targets": [c.target.name for c in backup.good_copies],
            "damaged_targets": [c.target.name for c in backup.complete_copies
                                if c.state == "damaged"]}
