"""Small records kept in ``state_dir``: which copies passed verification, which were seen
damaged, and when.

Written atomically (temporary file, fsync, rename), mode 0600, under one lock. Losing them loses
no data: they only protect more backups from pruning and feed status reports.

A copy (one backup on one target) is *seen damaged* from the moment a verify, a drill or a
restore's fetch finds it bad until a later verify or drill of that copy passes:
:func:`record_damaged` adds it to ``damaged.json``, :func:`record_verified` removes it.
:func:`checks` is the one reader every signal (list, status, metrics, report, prune) goes
through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conexa_backup.scratch import stale

VERIFIED = "verified.json"
DAMAGED = "damaged.json"
DRILLS = "drills.json"
KEEP_DRILLS = 500
RESTORE_JOURNAL = "restore-journal.json"  # written and read by actions/journal.py
# What every command that reads the state says while a journal is pending (CRITICAL): the
# live database and uploads may come from different backups until a locked run settles it.
RESTORE_PENDING = (
    "an interrupted restore left uploads and database from different backups; run any locked "
    "command, e.g. `conexa-backup backup` or `conexa-backup recover`, to finish or undo it")


def restore_pending(state_dir: Path) -> bool:
    """Whether a restore's swap was interrupted and is not yet finished or undone (the journal
    ``actions/journal.recover`` settles). Here, not there: ``status`` and ``list`` ask, and
    must not load psycopg to."""
    return (state_dir / RESTORE_JOURNAL).exists()


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


def _now(when: datetime | None) -> str:
    return (when or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def record_verified(state_dir: Path, backup_id: str, target: str,
                    when: datetime | None = None) -> None:
    """Remember that ``backup_id`` on ``target`` passed verification (or a drill); a damage
    seen before on that copy is forgotten: the newest check is the one that counts."""
    with _locked(state_dir):
        data = _read(state_dir / VERIFIED)
        data.setdefault(backup_id, {})[target] = _now(when)
        write_json(state_dir / VERIFIED, data)
        _drop(state_dir / DAMAGED, [(backup_id, target)])


def record_damaged(state_dir: Path, backup_id: str, target: str, why: str,
                   when: datetime | None = None) -> None:
    """Remember that ``backup_id`` on ``target`` was found bad (a checksum mismatch, a missing
    file, a failed drill), and why; it stays damaged until :func:`record_verified`."""
    with _locked(state_dir):
        data = _read(state_dir / DAMAGED)
        data.setdefault(backup_id, {})[target] = {"at": _now(when), "why": why}
        write_json(state_dir / DAMAGED, data)


def forget_copies(state_dir: Path, copies: Iterable[tuple[str, str]],
                  records: Iterable[str] = (VERIFIED, DAMAGED)) -> None:
    """Drop what checks found of copies (backup id, target) that were deleted: a deleted
    copy is neither damaged nor the newest verified one on its target any more. ``records``:
    which of the files (``DAMAGED`` alone for copies a listing no longer shows)."""
    copies = list(copies)
    files = [state_dir / name for name in records if (state_dir / name).exists()]
    if copies and files:
        with _locked(state_dir):
            for path in files:
                _drop(path, copies)


def _drop(path: Path, copies: Iterable[tuple[str, str]]) -> None:
    """Remove (id, target) entries from a per-copy record; the caller holds the lock."""
    data = _read(path)
    changed = False
    for backup_id, target in copies:
        entry = data.get(backup_id)
        if isinstance(entry, dict) and target in entry:
            del entry[target]
            changed = True
    if changed:
        write_json(path, {k: v for k, v in data.items() if v})


def verified(state_dir: Path) -> dict[str, dict[str, str]]:
    """backup id -> {target: ISO time of its last successful verification}."""
    return _read(state_dir / VERIFIED)


@dataclass(frozen=True)
class Damage:
    """Why and since when a copy counts as damaged."""

    at: str  # ISO time it was found bad
    why: str


@dataclass(frozen=True)
class Checks:
    """What verifies, drills and restores found out about copies: the one place that says
    whether a copy is known to be damaged, and which copy last passed a check."""

    damaged: dict[tuple[str, str], Damage]
    passed: dict[tuple[str, str], str]  # (id, target) -> time of its last passed check

    def damage(self, backup_id: str, target: str) -> Damage | None:
        return self.damaged.get((backup_id, target))

    def newest_passed(self, target: str) -> str | None:
        """The newest backup id whose copy on ``target`` passed a verify or drill and has not
        been found damaged since."""
        ids = [i for (i, t) in self.passed if t == target and (i, t) not in self.damaged]
        from conexa_backup.manifest import id_sort_key  # pydantic: not for every command
        return max(ids, key=id_sort_key) if ids else None


def checks(state_dir: Path) -> Checks:
    """The recorded checks of every copy (an empty record when there is no state yet)."""
    damaged = {(str(i), str(t)): Damage(str(d.get("at")), str(d.get("why")))
               for i, targets in _read(state_dir / DAMAGED).items() if isinstance(targets, dict)
               for t, d in targets.items() if isinstance(d, dict)}
    passed = {(str(i), str(t)): str(when) for i, targets in verified(state_dir).items()
              if isinstance(targets, dict) for t, when in targets.items()}
    return Checks(damaged, passed)


def record_drill(state_dir: Path, result: dict[str, Any], damage: str | None = None) -> None:
    """Append a drill result (``DrillResult.to_dict()``); the newest ``KEEP_DRILLS`` are kept.

    A passed drill counts as a verification; ``damage`` (why the copy did not restore) marks
    the copy damaged; a drill that could not run does neither.
    """
    _append(state_dir / DRILLS, "drills", result, KEEP_DRILLS)
    copy = str(result["backup_id"]), str(result["target"])
    if result.get("ok"):
        record_verified(state_dir, *copy)
    elif damage is not None:
        record_damaged(state_dir, *copy, damage)


def drill_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every recorded drill, oldest first, those that could not run (``outcome``
    ``not_run``: no age identity here) included."""
    found = _read(state_dir / DRILLS).get("drills", [])
    return [d for d in found if isinstance(d, dict)]


def drills(state_dir: Path) -> list[dict[str, Any]]:
    """Recorded drills that ran (passed or failed), oldest first: one that could not run
    proved nothing either way, so it is no failed drill (see :func:`drill_records`)."""
    return [d for d in drill_records(state_dir) if d.get("outcome") != "not_run"]


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
