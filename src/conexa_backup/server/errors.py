"""What an error means over HTTP: one place maps exceptions to a status, a stable ``error``
code and a one-line message, as ``cli._guard`` maps them to exit codes. No web imports.

The codes are part of the API (the admin panel switches on them); never rename one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conexa_backup.actions.download import ArtifactNotFoundError
from conexa_backup.errors import (
    BackupNotFoundError,
    BusyError,
    ConexaError,
    ConfigError,
    IntegrityError,
    JobNotFoundError,
    LockedError,
    StorageError,
    UsageError,
)
from conexa_backup.server.auth import AuthError


class ApiError(ConexaError):
    """A refusal a route decides itself: ``status`` and ``code`` as answered."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra


@dataclass
class Answer:
    """The HTTP status and JSON body for an error."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


# Most specific first: BusyError is a LockedError.
_MAPPING: list[tuple[type[ConexaError], int, str]] = [
    (JobNotFoundError, 404, "job_not_found"),
    (BackupNotFoundError, 404, "backup_not_found"),
    (ArtifactNotFoundError, 404, "artifact_not_found"),
    (BusyError, 409, "busy"),
    (LockedError, 409, "locked"),
    (UsageError, 422, "bad_request"),
    (IntegrityError, 409, "damaged"),
    (StorageError, 503, "target_unreachable"),
    (ConfigError, 500, "config_error"),
]


def audit_outcome(status: int, code: str) -> str:
    """The audit log's outcome for an answer: ``ok`` below 400, ``refused: <code>`` for 4xx,
    ``failed: <code>`` for 5xx."""
    if status < 400:
        return "ok"
    return f"{'refused' if status < 500 else 'failed'}: {code}"


def outcome_of(exc: BaseException) -> str:
    """:func:`audit_outcome` of the answer ``exc`` makes."""
    found = answer(exc)
    return audit_outcome(found.status, str(found.body["error"]))


def answer(exc: BaseException, redact: Any = None) -> Answer:
    """The status and body for ``exc``: ``{"error": code, "message": one line, ...}``.

    ``redact`` (str -> str) masks configured secrets in messages that come from libraries
    and servers. Anything that is not a :class:`ConexaError` is a bug: 500 ``internal``, its
    text never shown (it may hold anything).
    """
    def clean(text: str) -> str:
        text = text.strip().splitlines()[0] if text.strip() else text
        return str(redact(text)) if redact is not None else text

    if isinstance(exc, AuthError):
        return Answer(exc.status, {"error": exc.code, "message": clean(str(exc))})
    if isinstance(exc, ApiError):
        return Answer(exc.status, {"error": exc.code, "message": clean(str(exc)), **exc.extra})
    if isinstance(exc, ConexaError):
        for kind, status, code in _MAPPING:
            if isinstance(exc, kind):
                body: dict[str, Any] = {"error": code, "message": clean(str(exc))}
                if isinstance(exc, BusyError):
                    body |= {"holder": exc.holder, "since": exc.since}
                if exc.hint:
                    body["hint"] = exc.hint
                return Answer(status, body)
        return Answer(500, {"error": "failed", "message": clean(str(exc))})
    return Answer(500, {"error": "internal", "message": "internal error (see the server log)"})
