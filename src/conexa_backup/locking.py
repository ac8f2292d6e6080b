"""One run at a time: an advisory lock on a file in ``state_dir``.

``flock`` locks die with their process, so a run killed with SIGKILL never blocks the next one;
the pid written into the file is only for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from conexa_backup.errors import ConexaError, LockedError

LOCK_NAME = "conexa-backup.lock"


@contextlib.contextmanager
def run_lock(state_dir: Path, what: str) -> Iterator[None]:
    """Hold the lock for the block.

    Raises:
        LockedError: another process holds it. ConexaError: ``state_dir`` is not writable.
    """
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConexaError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise LockedError(
                f"another conexa-backup run holds the lock {path} ({holder}); try again later"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
