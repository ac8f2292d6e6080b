"""The storage protocol: the handful of operations every target provides.

A target stores opaque objects under ``/``-separated keys relative to its own root (a folder,
a bucket prefix). Multipart or resumable details stay inside each target's module. Keys are
always produced by conexa-backup (``<backup id>/<artifact>``); :func:`check_key` refuses
anything that could escape the target's root.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conexa_backup.durations import parse_duration
from conexa_backup.errors import StorageError
from conexa_backup.retention import RetentionConfig

_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def normalize_prefix(prefix: str) -> str:
    """A bucket key prefix as ``"a/b/"`` (or ``""``), whatever slashes the config had."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


def check_key(key: str) -> str:
    """Return ``key`` if every part is a plain name; raise ValueError otherwise."""
    parts = key.split("/")
    if not parts or not all(_KEY_PART.match(p) for p in parts):
        raise ValueError(f"invalid storage key {key!r}")
    return key


class TargetConfig(BaseModel):
    """Fields common to every ``[[targets]]`` entry; each type subclasses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type_name: ClassVar[str] = ""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    type: str
    retention: RetentionConfig | None = None  # else the top-level [retention]
    price_per_gb_month: float | None = Field(default=None, ge=0)  # for `report` estimates
    # How old this target's newest good backup may be before `status` is CRITICAL; default:
    # [monitoring] max_backup_age, plus the period of an archive tier (monitor.expected_age).
    max_backup_age: str | None = None

    @field_validator("max_backup_age")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key (relative to the target root), size and time.

    ``version`` changes whenever the object's content may have (an ETag, a generation, a file's
    inode and change time); None when the store cannot say.
    """

    key: str
    size: int
    modified: datetime | None = None
    version: str | None = None


class Upload(Protocol):
    """An object being written. Nothing is visible under the key until :meth:`commit`."""

    def write(self, data: bytes) -> None:
        """Append bytes. Raises StorageError."""

    def commit(self) -> ObjectInfo:
        """Make the object visible under its key, durably. Raises StorageError."""

    def abort(self) -> None:
        """Discard everything written; never raises."""


class Target(Protocol):
    """A place backups are kept. Implementations raise :class:`StorageError` subclasses."""

    name: str

    def describe(self) -> str:
        """Where this target stores objects, for people (no secrets)."""

    def writer(self, key: str) -> Upload:
        """Start writing ``key`` (replacing any object there once committed)."""

    def open(self, key: str) -> BinaryIO:
        """Open ``key`` for streaming reads. Raises ObjectNotFoundError."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Committed objects whose key starts with ``prefix`` (in no particular order)."""

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""


@runtime_checkable
class Presigning(Protocol):
    """A target that can hand out a short-lived URL to GET one object directly (S3, GCS):
    the API answers a download with a redirect there instead of proxying the bytes."""

    def presign(self, key: str, seconds: int) -> str | None:
        """A URL that GETs ``key`` for ``seconds``; None when these credentials cannot sign
        (the caller then proxies). Raises StorageError."""


class GuardedReader:
    """A readable whose errors (SDK-specific, with no common base) become StorageError via
    ``to_error``, so that a failing read makes restores fall back to the next copy."""

    def __init__(self, inner: Any, to_error: Callable[[Exception], StorageError]) -> None:
        self._inner, self._to_error = inner, to_error

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._inner.read(n)
            return data
        except Exception as exc:
            raise self._to_error(exc) from None

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._inner.close()

    def __enter__(self) -> GuardedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
