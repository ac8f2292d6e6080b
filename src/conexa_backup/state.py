"""Small records kept in ``state_dir``: which backups passed verification, and when.

Written atomically (temporary file, fsync, rename), mode 0600. Losing them loses no data: they
only protect more backups from pruning and feed status reports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conexa_backup.manifest import id_sort_key
from conexa_backup.scratch import stale

VERIFIED = "verified.json"
DRILLS = "drills.json"
KEEP_DRILLS = 500


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temporary file, fsync'ed, renamed (no torn file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: Path) -> Path:
    """Create ``path`` and every missing folder above it 0700, whatever the umask; return it.

    ``mkdir(parents=True)`` would give the missing parents the umask's mode (0755 under 022):
    ``state_dir`` itself, ``cache/``... Folders that already exist are left as they are.

    Raises:
        OSError: a folder cannot be created, or ``path`` exists and is not a folder.
    """
    missing = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by a concurrent run: theirs, not ours
            continue
        folder.chmod(0o700)  # mkdir's mode is filtered through the umask
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    return path


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically with ``data`` as JSON (0600)."""
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise read-modify-write of the state files between concurrent runs (a verify or
    drill may run beside a backup: neither may lose the other's record)."""
    fd = os.open(state_dir / ".state.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def record_verified(state_dir: Path, backup_id: str, target: str,
                    when: datetime | None = None) -> None:
    """Remember that ``backup_id`` on ``target`` passed verification."""
    path = state_dir / VERIFIED
    with _locked(state_dir):
        data = _read(path)
        data.setdefault(backup_id, {})[target] = (when or datetime.now(UTC)).isoformat()
        write_json(path, data)


def verified(state_dir: Path) -> dict[str, dict[str, str]]:
    """backup id -> {target: ISO time of its last successful verification}."""
    return _read(state_dir / VERIFIED)


def newest_verified(state_dir: Path) -> str | None:
    """The newest backup id that passed verification on any target."""
    ids = [i for i, targets in verified(state_dir).items() if targets]
    return max(ids, key=id_sort_key) if ids else None


def record_drill(state_dir: Path, result: dict[str, Any]) -> None:
    """Append a drill result (``DrillResult.to_dict()``); the newest ``KEEP_DRILLS`` are kept."""
    _append(state_dir / DRILLS, "drills", result, KEEP_DRILLS)
    if result.get("ok"):
        record_verified(state_dir, str(result["backup_id"]), str(result["target"]))


def drills(state_dir: Path) -> list[dict[str, Any]]:
    """Recorded drill results, oldest first."""
    found = _read(state_dir / DRILLS).get("drills", [])
    return [d for d in found if isinstance(d, dict)]


def last_drills(state_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(backup id, target) -> the newest drill result of that copy."""
    return {(str(d.get("backup_id")), str(d.get("target"))): d for d in drills(state_dir)}


RUNS = "runs.json"
KEEP_RUNS = 2000


def record_run(state_dir: Path, run: dict[str, Any]) -> None:
    """Append one run's outcome (an event's JSON); the newest ``KEEP_RUNS`` are kept."""
    _append(state_dir / RUNS, "runs", run, KEEP_RUNS)


def _append(path: Path, key: str, item: dict[str, Any], keep: int) -> None:
    """Append ``item`` to the list under ``key`` in ``path``; the newest ``keep`` stay."""
    with _locked(path.parent):
        history = _read(path).get(key, [])
        history.append(item)
        write_json(path, {key: history[-keep:]})


def runs(state_dir: Path) -> list[dict[str, Any]]:
    """Recorded runs, oldest first."""
    found = _read(state_dir / RUNS).get("runs", [])
    return [r for r in found if isinstance(r, dict)]


def sweep_stale(state_dir: Path, now: float | None = None) -> list[Path]:
    """Remove scratch left by runs killed outright (SIGKILL, OOM): entries of ``staging/`` and
    ``drills/`` whose process is gone (:func:`conexa_backup.scratch.abandoned`), and any older
    than a day. They can hold plaintext dumps of personal data, and their names are random, so
    nothing else would ever find them. The caller holds the run lock; no run of ours lasts a
    day."""
    import shutil
    import time

    now = time.time() if now is None else now
    removed = []
    for folder in ("staging", "drills"):
        root = state_dir / folder
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            with contextlib.suppress(OSError):
                if stale(entry, now):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
                    removed.append(entry)
    return removed
