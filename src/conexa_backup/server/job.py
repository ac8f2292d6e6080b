"""One job's record and what is read back from its child's output files.

A job is the CLI run as a child process (see :mod:`conexa_backup.server.jobs`); its stdout
(``--json``) and stderr (``--verbose`` log lines and the final ``error:`` line) go to files in
the job's folder. Everything here is pure but for reading those files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

State = Literal["queued", "running", "succeeded", "partial", "failed", "canceled"]
Kind = Literal["backup", "restore"]
ACTIVE: tuple[State, ...] = ("queued", "running")
STDOUT = "stdout.json"
STDERR = "stderr.log"
MAX_STEPS = 50

# --verbose log lines: "INFO conexa_backup.actions.backup: dumping database"
_STEP = re.compile(r"^(?:INFO|WARNING|ERROR) [\w.]+: (?P<text>.+)$")
# Credentials inside URLs ("postgresql://user:secret@host"): the CLI already masks the secrets
# of its config; this catches one that reaches an error text some other way.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


def now() -> str:
    """The current time as the job records keep it: ISO 8601, UTC, ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Job:
    """A job as stored in ``state_dir/jobs/<id>.json`` and answered by the API."""

    id: str
    kind: Kind
    args: dict[str, str]
    sub: str
    state: State = "queued"
    created: str = field(default_factory=now)
    started: str | None = None
    finished: str | None = None
    pid: int | None = None
    pid_start: int | None = None  # /proc/PID/stat start time: tells a reused pid apart
    exit_code: int | None = None
    backup_id: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    result: dict[str, Any] | None = None  # the child's --json answer
    steps: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        """Raises: TypeError, KeyError: not a job record."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def outcome(code: int, cancel_requested: bool) -> State:
    """The state a job ends in for the child's exit ``code`` (the CLI's documented codes:
    0 success, 3 partial, 130/143 interrupted). A job we asked to stop that still failed is
    ``canceled``; one that finished cleanly before the signal counts what it did."""
    if code == 0:
        return "succeeded"
    if code in (130, 143) or cancel_requested:
        return "canceled"
    return "partial" if code == 3 else "failed"


def redact(text: str) -> str:
    """``text`` with any password inside a URL masked."""
    return _URL_PASSWORD.sub(r"\g<head>********@", text)


def read_result(folder: Path) -> dict[str, Any] | None:
    """The child's ``--json`` answer, or None if it wrote none (failed before) or not yet."""
    try:
        data = json.loads((folder / STDOUT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stderr_lines(folder: Path) -> list[str]:
    try:
        text = (folder / STDERR).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def read_steps(folder: Path) -> list[str]:
    """The child's progress so far: its last :data:`MAX_STEPS` log messages, redacted."""
    found = (_STEP.match(line) for line in _stderr_lines(folder))
    return [redact(m["text"]) for m in found if m][-MAX_STEPS:]


def read_error(folder: Path) -> str | None:
    """Why the child failed, one line, redacted: its ``error:`` line (the CLI prints one
    for every failure), else the first line of its stderr, else None."""
    lines = _stderr_lines(folder)
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    first = errors[-1] if errors else (lines[0] if lines else None)
    return redact(first)[:500] if first else None


def job_answer(job: Job, redact: Callable[[str], str], *, full: bool = True) -> dict[str, Any]:
    """A job as the API answers it (jobs routes, status's ``running_job``): no pid, every
    text passed through ``redact`` (the CLI masks its secrets already; this catches one that
    reached a message some other way). ``full``: with its progress steps and CLI answer."""
    data: dict[str, Any] = {
        "id": job.id, "kind": job.kind, "state": job.state, "sub": job.sub,
        "backup_id": job.backup_id, "args": job.args, "created": job.created,
        "started": job.started, "finished": job.finished, "exit_code": job.exit_code,
        "error": job.error, "cancel_requested": job.cancel_requested}
    if full:
        data |= {"steps": job.steps, "result": job.result}
    redacted: dict[str, Any] = _redact_all(data, redact)
    return redacted


def _redact_all(value: Any, redact: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_all(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_all(v, redact) for v in value]
    return value
