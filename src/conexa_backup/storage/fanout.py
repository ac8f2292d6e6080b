"""One stream, several targets: a sink that writes to every target's upload.

Each target's upload runs in its own thread behind a small bounded queue, so the producer runs
once and the targets receive concurrently; the slowest target sets the pace (backpressure), and
memory stays at a few chunks per target. A target that fails is dropped from the stream and its
failure recorded; the others carry on, so losing one copy never loses the backup. Only when
every target has failed does writing raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from conexa_backup.errors import ConexaError, StorageError
from conexa_backup.pipeline import ThreadedSink
from conexa_backup.storage.base import ObjectInfo, Target, Upload

log = logging.getLogger(__name__)


class AllTargetsFailed(StorageError):
    """Every target of one upload failed; each failure names its target."""

    def __init__(self, failures: dict[str, str]) -> None:
        # Not StorageError's "target 'X': ": there is no one target to name, and each
        # failure already names its own.
        ConexaError.__init__(self, "every target failed: " + "; ".join(failures.values()))
        self.target = ", ".join(failures)
        self.failures = failures


QUEUE_CHUNKS = 3


class ThreadedUpload:
    """Feeds an :class:`Upload` from a bounded queue in a thread of its own.

    An error in the thread is raised by the next ``write`` or by ``commit``.
    """

    def __init__(self, inner: Upload, name: str) -> None:
        self._inner = inner
        self._name = name
        self._sink = ThreadedSink(inner, f"upload-{name}", QUEUE_CHUNKS, self._as_storage_error)

    def _as_storage_error(self, exc: BaseException) -> BaseException:
        """Any failure of one target's upload (an SDK error, a full spool disk) is that
        target's failure, so the others go on."""
        if isinstance(exc, ConexaError) or not isinstance(exc, Exception):
            return exc
        return StorageError(self._name, f"{type(exc).__name__}: {exc}")

    def write(self, data: bytes) -> None:
        self._sink.write(data)

    def commit(self) -> ObjectInfo:
        self._sink.close()
        try:
            return self._inner.commit()
        except Exception as exc:
            raise self._as_storage_error(exc) from exc

    def abort(self) -> None:
        self._sink.abandon()
        self._inner.abort()


class MultiUpload:
    """Writes ``key`` to every target in ``targets``; see module docstring."""

    def __init__(self, targets: Sequence[Target], key: str) -> None:
        self.key = key
        self.failures: dict[str, str] = {}
        self._uploads: dict[str, Upload] = {}
        for target in targets:
            try:
                self._uploads[target.name] = ThreadedUpload(target.writer(key), target.name)
            except ConexaError as exc:
                self._fail(target.name, exc)
        self._check_alive()

    def _fail(self, name: str, exc: BaseException) -> None:
        upload = self._uploads.pop(name, None)
        if upload is not None:
            upload.abort()
        self.failures[name] = str(exc)
        log.error("%s: %s", self.key, exc)

    def _check_alive(self) -> None:
        if not self._uploads:
            raise AllTargetsFailed(self.failures)

    def write(self, data: bytes) -> int:
        for name, upload in list(self._uploads.items()):
            try:
                upload.write(data)
            except ConexaError as exc:
                self._fail(name, exc)
        self._check_alive()
        return len(data)

    def commit(self) -> dict[str, ObjectInfo]:
        """Commit on every live target; return what each stored."""
        stored: dict[str, ObjectInfo] = {}
        for name, upload in list(self._uploads.items()):
            try:
                stored[name] = upload.commit()
            except ConexaError as exc:
                self._fail(name, exc)
        self._uploads.clear()
        if not stored:
            raise AllTargetsFailed(self.failures)
        return stored

    def abort(self) -> None:
        for upload in self._uploads.values():
            upload.abort()
        self._uploads.clear()
