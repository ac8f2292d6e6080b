"""One run at a time: an advisory lock on a file in ``state_dir``.

``flock`` locks die with their process, so a run killed with SIGKILL never blocks the next one;
the line written into the file (pid, what, since when) is only for messages: :func:`holder`
and :class:`~conexa_backup.errors.LockedError`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from conexa_backup.errors import ConexaError, LockedError

LOCK_NAME = "conexa-backup.lock"


def _open(path: Path, flags: int) -> int:
    """Open (creating, 0600) the lock file.

    Raises:
        ConexaError: it cannot be opened (``state_dir`` missing or not writable).
    """
    try:
        return os.open(path, flags | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConexaError(f"cannot open lock file {path}: {exc.strerror}") from None


def _line(fd: int) -> str:
    """The holder's line in the lock file: ``pid 123, backup`` and when it took the lock."""
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()


@contextlib.contextmanager
def run_lock(state_dir: Path, what: str) -> Iterator[None]:
    """Hold the lock for the block.

    Raises:
        LockedError: another process holds it. ConexaError: ``state_dir`` is not writable.
    """
    path = state_dir / LOCK_NAME
    fd = _open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _line(fd) or "unknown"
            raise LockedError(
                f"another conexa-backup run holds the lock {path} ({holder}); try again later"
            ) from None
        os.ftruncate(fd, 0)
        since = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        os.pwrite(fd, f"pid {os.getpid()}, {what}, since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as its file says: ``pid`` and ``since`` are None when the file
    does not say (an older version wrote no time)."""

    pid: int | None
    what: str
    since: str | None


_LINE = re.compile(r"^pid (?P<pid>\d+), (?P<what>.*?)(?:, since (?P<since>\S+))?$")


def holder(state_dir: Path) -> Holder | None:
    """Who holds the lock now, or None if nobody does.

    Probes with a non-blocking shared ``flock`` released at once, so it never waits and keeps
    a starting run out for microseconds only (that run would exit 4, like any lost race).

    Raises:
        ConexaError: the lock file cannot be opened.
    """
    path = state_dir / LOCK_NAME
    fd = _open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            line = _line(fd)
            found = _LINE.match(line)
            if found is None:
                return Holder(None, line or "unknown", None)
            return Holder(int(found["pid"]), found["what"], found["since"])
        return None  # closing the descriptor releases the probe's lock
    finally:
        os.close(fd)
