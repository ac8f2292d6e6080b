"""``type = "local"``: a folder on a local (or mounted) file system.

Objects are files under ``path``; a backup is a sub-folder. Writes go to a hidden temporary
name in the same folder, are fsync'ed, then renamed into place, so a crash never leaves a
half-written file under a real key. Files are 0600 and folders 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, ClassVar, Literal

from conexa_backup.errors import ObjectNotFoundError, StorageError
from conexa_backup.scratch import scratch_name, stale
from conexa_backup.storage.base import GuardedReader, ObjectInfo, TargetConfig, check_key

_TMP_PREFIX = ".tmp-"


class LocalTargetConfig(TargetConfig):
    """A folder; created (0700) on first use."""

    type_name: ClassVar[str] = "local"
    type: Literal["local"]
    path: Path


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {exc.filename}"
    return exc.strerror or str(exc)


class _LocalUpload:
    def __init__(self, target: LocalTarget, final: Path) -> None:
        self._target = target
        self._final = final
        try:
            target.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._tmp = final.with_name(_TMP_PREFIX + scratch_name(final.name))
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise target.error(exc) from exc
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._size = 0

    def write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise self._target.error(exc) from exc
        self._size += len(data)

    def commit(self) -> ObjectInfo:
        try:
            os.fsync(self._file.fileno())
            self._file.close()
            self._tmp.replace(self._final)
            _fsync_dir(self._final.parent)
        except OSError as exc:
            self.abort()
            raise self._target.error(exc) from exc
        return ObjectInfo(self._target.key_of(self._final), self._size)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()
        self._target.remove_if_empty(self._final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalTarget:
    """Implements :class:`conexa_backup.storage.base.Target` on a folder."""

    def __init__(self, config: LocalTargetConfig) -> None:
        self.name = config.name
        self.root = config.path

    def describe(self) -> str:
        return str(self.root)

    def error(self, exc: OSError) -> StorageError:
        return StorageError(self.name, f"{self.root}: {_describe_oserror(exc)}")

    def path_of(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def writer(self, key: str) -> _LocalUpload:
        return _LocalUpload(self, self.path_of(key))

    def open(self, key: str) -> BinaryIO:
        try:
            fh = open(self.path_of(key), "rb")  # noqa: SIM115 - the caller closes it
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(self.name, f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            raise self.error(exc) from exc
        # A read error (EIO on a failing disk) is this copy's failure: restores fall back.
        return GuardedReader(fh, lambda exc: StorageError(  # type: ignore[return-value]
            self.name, f"{self.root}: {exc}"))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.exists():
            return  # never written to yet
        if not self.root.is_dir():
            raise StorageError(self.name, f"{self.root} is not a folder")

        def fail(exc: OSError) -> None:
            raise exc

        try:
            for dirpath, dirnames, filenames in os.walk(self.root, onerror=fail):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for fname in filenames:
                    if fname.startswith("."):
                        continue  # our temporaries and anything hidden: never ours to report
                    path = Path(dirpath, fname)
                    key = self.key_of(path)
                    if not key.startswith(prefix):
                        continue
                    st = path.stat()
                    # ctime: an edit that restores the mtime (touch -r) still changes it.
                    yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC),
                                     f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        except OSError as exc:
            raise self.error(exc) from exc

    def delete(self, key: str) -> None:
        path = self.path_of(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self.error(exc) from exc
        self.remove_if_empty(path.parent)

    def sweep_temporaries(self) -> int:
        """Remove our hidden temporaries (``.tmp-*``) left by runs killed outright
        (:func:`conexa_backup.scratch.stale`: their process is gone, or they are a day old)."""
        import time

        now = time.time()
        removed = 0
        if not self.root.is_dir():
            return removed
        for tmp in self.root.glob(f"*/{_TMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if stale(tmp, now):
                    tmp.unlink()
                    removed += 1
                    self.remove_if_empty(tmp.parent)
        return removed

    def remove_if_empty(self, folder: Path) -> None:
        """Remove a backup's folder once it is empty; never the root, never anything else."""
        with contextlib.suppress(OSError):
            if folder != self.root and not any(folder.iterdir()):
                folder.rmdir()


def create(config: LocalTargetConfig) -> LocalTarget:
    """Registry entry point."""
    return LocalTarget(config)
