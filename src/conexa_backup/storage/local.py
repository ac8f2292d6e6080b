"""``type = "local"``: a folder on a local (or mounted) file system.

Objects are files under ``path``; a backup is a sub-folder. Writes go to a hidden temporary
name in the same folder, are fsync'ed, then renamed into place, so a crash never leaves a
half-written file under a real key. Files are 0600 and folders 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, ClassVar, Literal

from pydantic import StrictBool, model_validator

from conexa_backup.errors import ObjectNotFoundError, StorageError
from conexa_backup.scratch import scratch_name, stale
from conexa_backup.storage.base import GuardedReader, ObjectInfo, TargetConfig, check_key

_TMP_PREFIX = ".tmp-"


class LocalTargetConfig(TargetConfig):
    """A folder; created (0700) on first use, inside a folder that must already exist."""

    type_name: ClassVar[str] = "local"
    type: Literal["local"]
    path: Path
    # true: use ``path`` only while it is on a mounted file system other than the root one;
    # a folder (the backup disk's mount point): only while that folder is a mount point.
    require_mount: StrictBool | Path = False

    @model_validator(mode="after")
    def _mount_holds_path(self) -> LocalTargetConfig:
        mount = self.require_mount
        holds = isinstance(mount, Path) and mount.is_absolute() and self.path.is_relative_to(mount)
        if isinstance(mount, Path) and not holds:
            raise ValueError(f"require_mount must be true, false or an absolute folder holding "
                             f"path ({self.path})")
        return self


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
        target.check_mounted()
        try:
            target.make_root()
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


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path`` (or would: its nearest existing
    folder), symbolic links resolved."""
    folder = Path(os.path.realpath(path))
    while not folder.exists():
        folder = folder.parent
    while not os.path.ismount(folder):
        folder = folder.parent
    return folder


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
        self.require_mount = config.require_mount

    def check_mounted(self) -> None:
        """Refuse to touch the folder while its disk is not mounted (``require_mount``): an
        empty mount point would take the backups on the root disk, and look like a target
        holding none.

        Raises:
            StorageError: ``require_mount`` is set and the disk is not mounted.
        """
        why = self._not_mounted()
        if why is not None:
            raise StorageError(self.name, why)

    def _not_mounted(self) -> str | None:
        if self.require_mount is False:
            return None
        if isinstance(self.require_mount, Path):
            if os.path.ismount(self.require_mount):
                return None
            return (f"{self.require_mount} is not mounted (require_mount): refusing to use "
                    f"{self.root}")
        if _mount_point(self.root) != Path("/"):
            return None
        return (f"{self.root} is on the root file system, not on a mounted disk "
                "(require_mount = true): is the disk mounted?")

    def make_root(self) -> None:
        """Create the target folder (0700), never its parents: a missing parent is a disk that
        is not mounted, and creating it would fill the root disk instead.

        Raises:
            OSError: as :meth:`pathlib.Path.mkdir`; FileNotFoundError for a missing parent.
        """
        self.root.mkdir(mode=0o700, exist_ok=True)

    def describe(self) -> str:
        return str(self.root)

    def error(self, exc: OSError) -> StorageError:
        if isinstance(exc, FileNotFoundError) and not self.root.parent.is_dir():
            return StorageError(self.name, f"{self.root.parent} does not exist: the target "
                                "folder is only created inside an existing folder (is the "
                                "backup disk mounted?)")
        return StorageError(self.name, f"{self.root}: {_describe_oserror(exc)}")

    def path_of(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def writer(self, key: str) -> _LocalUpload:
        return _LocalUpload(self, self.path_of(key))

    def open(self, key: str) -> BinaryIO:
        self.check_mounted()
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
        self.check_mounted()
        if not self.root.exists():
            return  # never written to yet
        if not self.root.is_dir():
            raise StorageError(self.name, f"{self.root} is not a folder")

        def fail(exc: OSError) -> None:
            raise exc

        try:
            start = self._listed_folder(prefix)
            if start is None:
                return
            for dirpath, dirnames, filenames in os.walk(start, onerror=fail):
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

    def _listed_folder(self, prefix: str) -> Path | None:
        """The folder to walk for the keys starting with ``prefix``: the deepest one its
        folders name (``packs/``: the packs, not every backup's files), or None when that
        holds nothing listable (missing, not a folder, a link: the whole walk would not
        enter it either). Raises OSError."""
        start = self.root
        for part in prefix.split("/")[:-1]:
            if not part:  # "a//b": no key has it; the whole walk finds none either
                return self.root
            if part.startswith("."):  # hidden, "..": never listed
                return None
            start = start / part
            try:
                if not stat.S_ISDIR(start.lstat().st_mode):
                    return None
            except FileNotFoundError:
                return None
        return start

    def delete(self, key: str) -> None:
        self.check_mounted()
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
        if self._not_mounted() is not None or not self.root.is_dir():
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
