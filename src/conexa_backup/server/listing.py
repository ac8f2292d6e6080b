"""The list and status answers, from an in-memory snapshot of the catalog (no web imports).

A :class:`Listing` keeps what one scan of every target found (``ctx.scan``: the manifest
cache, damage records) plus the drills and verifications recorded in ``state_dir``, and the
rendered list answer, so a request costs a few ``stat`` calls and a copy of bytes, not a
listing of every target. The snapshot is taken again:

- when it is older than ``ttl`` (30 s; 5 s while a target could not be listed);
- at once, when something we know of changes what it says: a job ended, a backup was deleted
  (:meth:`Listing.invalidate`), or one of the state files that hold damage, verification,
  drill and run records, or the jobs folder, changed (a CLI ``verify`` that found damage, a
  cron backup that recorded its run, a job record replaced: their ``stat`` is compared on
  every request).

Refreshing is single-flight: one request scans, and requests that arrive meanwhile wait
for that scan when the snapshot is known outdated (what they would be shown is no longer
true), or get the previous snapshot when it merely reached its age (it was true ``ttl`` ago;
nothing we know of changed it). No request waits more than :data:`WAIT_LIMIT`: a target that
stopped answering must not hold every worker thread (then the previous snapshot is answered,
its ``listed_at`` saying how old, or 503 ``listing_in_progress`` before the first).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from conexa_backup import render
from conexa_backup.actions import monitor
from conexa_backup.actions.context import Context
from conexa_backup.catalog import Backup
from conexa_backup.errors import ConexaError
from conexa_backup.manifest import id_sort_key
from conexa_backup.server.errors import Answer, ApiError, answer
from conexa_backup.server.job import Job, job_answer
from conexa_backup.server.jobs import JOBS_DIR
from conexa_backup.state import DAMAGED, DRILLS, RUNS, VERIFIED, checks, last_drills

TTL = 30.0  # seconds a snapshot is answered from, when nothing we know of changed
TTL_UNREACHABLE = 5.0  # ... when a target could not be listed: show it back up soon
STATUS_TTL = 1.0  # seconds a status body is reused (its ages are whole seconds)
WAIT_LIMIT = 15.0  # seconds a request waits for the scan under way (a target may hang)
# Written by verify, drills, restores (damage, verification) and at the end of every CLI
# run (runs.json): a change to any of them may change what the list or status says.
WATCHED = (DAMAGED, VERIFIED, DRILLS, RUNS)

log = logging.getLogger(__name__)

Key = tuple[int, tuple[tuple[int, int, int] | None, ...]]


@dataclass
class Snapshot:
    """What one scan found, as of ``taken``; ``error`` when no target could be listed."""

    key: Key
    taken: float  # time.monotonic() when the scan started
    listed_at: str  # the same, as ISO 8601 UTC (said in the answers)
    backups: list[Backup] = field(default_factory=list)  # oldest first, as scanned
    unreachable: dict[str, str] = field(default_factory=dict)  # target -> why (redacted)
    error: Answer | None = None  # what to answer instead (server.errors.answer)
    drills: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    passed: dict[tuple[str, str], str] = field(default_factory=dict)  # last verify/drill
    _rendered: dict[str | None, bytes] = field(default_factory=dict)

    def check(self) -> None:
        """Raises: ApiError: the scan's error, as :func:`server.errors.answer` maps it
        (503 ``target_unreachable`` when no target could be listed)."""
        if self.error is not None:
            body = dict(self.error.body)
            raise ApiError(self.error.status, body.pop("error"), body.pop("message"), **body)

    def answer(self, target: str | None = None) -> bytes:
        """The list answer (JSON bytes), for every target or only ``target``; rendered once.

        Raises:
            ApiError: see :meth:`check`.
        """
        self.check()
        found = self._rendered.get(target)
        if found is None:  # two threads may render it at once: same bytes, no harm
            found = json.dumps(list_answer(self, target), ensure_ascii=False).encode()
            self._rendered[target] = found
        return found


def list_answer(snap: Snapshot, target: str | None = None) -> dict[str, Any]:
    """``{"backups": [...]}`` newest first, as the seed lists them (see :func:`entry`), plus
    ``incomplete`` (ids left out: no copy has a manifest yet), ``unreachable`` and
    ``listed_at``. With ``target``, only that target's copies count, as ``list --target``."""
    backups = snap.backups
    unreachable = snap.unreachable
    if target is not None:
        backups = [Backup(b.id, [c for c in b.copies if c.target.name == target])
                   for b in backups]
        backups = [b for b in backups if b.copies]
        unreachable = {t: e for t, e in unreachable.items() if t == target}
    shown = [b for b in backups if listed(b)]
    return {
        "backups": [entry(b, snap.drills, snap.passed)
                    for b in sorted(shown, key=lambda b: id_sort_key(b.id), reverse=True)],
        "incomplete": [b.id for b in reversed(backups) if not listed(b)],
        "unreachable": unreachable,
        "listed_at": snap.listed_at,
    }


def listed(backup: Backup) -> bool:
    """Whether the list shows ``backup``: it has a complete copy, or a copy whose manifest is
    there but unusable (shown ``damaged``). A backup with only incomplete copies (a run in
    progress, or one interrupted) is left out, never shown as a backup: only its id is said,
    under ``incomplete``."""
    return bool(backup.complete_copies) or any(c.problem for c in backup.copies)


def seed_status(backup: Backup) -> str:
    """The seed's ``status``: ``damaged`` when a copy is (found bad by a verify, drill or
    restore, or its manifest is unusable: ``Backup.status``); ``warning`` when it was stored
    with warnings or its uploads look wrong (empty or shrunken: ``Backup.suspect``);
    ``success`` otherwise."""
    if backup.status != "complete":
        return "damaged"  # listed backups are never merely incomplete (see listed)
    manifest = backup.manifest
    if backup.suspect is not None or (manifest is not None and manifest.warnings):
        return "warning"
    return "success"


def seed_size(n: int) -> str:
    """A size as the seed writes it (``"2.5GB"``): decimal units, one decimal."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{n}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def entry(backup: Backup, drills: dict[tuple[str, str], dict[str, Any]],
          passed: dict[tuple[str, str], str]) -> dict[str, Any]:
    """One backup: the seed's ``id``, ``date``, ``size``, ``status`` and ``location`` (the
    targets holding a good copy), then what ``list --json`` says of it
    (:func:`render.backup_entry`), its ``status`` there renamed ``state``, and ``targets``:
    every copy with its state, last passed check and, if damaged, since when, why and what
    kind of damage (``reason``: :attr:`Copy.reason`)."""
    rich = render.backup_entry(backup, drills)
    created = rich["created_at"] or backup.id
    date = f"{created[0:4]}-{created[5:7]}-{created[8:10]}" if rich["created_at"] \
        else f"{created[0:4]}-{created[4:6]}-{created[6:8]}"
    seed = {"id": backup.id, "date": date, "size": seed_size(rich["size_bytes"]),
            "status": seed_status(backup), "location": rich["targets"]}
    copies = []
    for c in backup.copies:
        why = c.why_damaged
        copies.append({"target": c.target.name, "state": c.state,
                       "verified_at": passed.get((backup.id, c.target.name)),
                       "damaged_at": why[0] if why else None, "why": why[1] if why else None,
                       "reason": c.reason})
    rest = {k: v for k, v in rich.items() if k not in seed and k != "targets"}
    return {**seed, **rest, "state": rich["status"], "targets": copies}


def scan(ctx: Context, redact: Callable[[str], str], key: Key) -> Snapshot:
    """A snapshot of every configured target, as ``list`` sees them (one ``ctx.scan``)."""
    taken = time.monotonic()
    snap = Snapshot(key, taken, datetime.now(UTC).isoformat(timespec="seconds")
                    .replace("+00:00", "Z"))
    state_dir = ctx.config.state_dir
    try:
        unreachable: dict[str, str] = {}
        snap.backups = ctx.scan(ctx.targets(), unreachable=unreachable)
        snap.unreachable = {t: redact(e) for t, e in unreachable.items()}
    except ConexaError as exc:  # every target failed: answered until the next refresh
        snap.error = answer(exc, redact)  # 503 target_unreachable for a StorageError
    snap.drills = last_drills(state_dir)
    snap.passed = checks(state_dir).passed
    if snap.error is None:
        snap.answer()  # render now, in the scanning thread: waiters get it ready
    log.info("listed %d backup(s) on %d target(s) in %.2f s%s", len(snap.backups),
             len(ctx.config.targets), time.monotonic() - taken,
             f" ({len(snap.unreachable)} unreachable)" if snap.unreachable
             else " (no target could be listed)" if snap.error else "")
    return snap


def status_answer(listing: Listing, running: Job | None) -> dict[str, Any]:
    """``status --json`` (:func:`monitor.health` over the snapshot) plus ``newest_backup``
    (the list's first entry: the seed's "status of the last backup", whatever its state),
    ``running_job`` (a job of the API's, or None) and ``listed_at``. The health part is
    reused for :data:`STATUS_TTL` while the snapshot is the same (ages move by less than
    that); the running job is read every time.

    Raises:
        ApiError: 503 ``target_unreachable`` when no target could be listed.
    """
    body = dict(listing.status())
    body["running_job"] = (job_answer(running, listing.redact, full=False)
                          if running is not None else None)
    return body


def health_answer(ctx: Context, snap: Snapshot) -> dict[str, Any]:
    """What :func:`status_answer` says but the running job, from ``snap``, ages as of now."""
    body = render.status_json(monitor.health(ctx, scanned=(snap.backups, snap.unreachable)))
    shown = [b for b in snap.backups if listed(b)]
    newest = max(shown, key=lambda b: id_sort_key(b.id)) if shown else None
    body["newest_backup"] = entry(newest, snap.drills, snap.passed) if newest else None
    body["listed_at"] = snap.listed_at
    return body


class Listing:
    """The list cache of one server process: thread-safe, one scan at a time."""

    def __init__(self, ctx: Context, redact: Callable[[str], str], *, ttl: float = TTL,
                 ttl_unreachable: float = TTL_UNREACHABLE) -> None:
        self.ctx = ctx  # long-lived: its targets (S3/GCS clients) are made once
        self.redact = redact
        self._ttl, self._ttl_unreachable = ttl, ttl_unreachable
        # The jobs folder too: a job's record is replaced when it ends, and the one reap
        # that sees the end may be a jobs request's, not Services.tick()'s.
        self._watched = [ctx.config.state_dir / name for name in (*WATCHED, JOBS_DIR)]
        self._cond = threading.Condition()
        self._epoch = 0  # bumped by invalidate()
        self._snap: Snapshot | None = None
        self._scanning = False
        self._status_lock = threading.Lock()
        self._status: tuple[Snapshot, float, dict[str, Any]] | None = None

    def invalidate(self) -> None:
        """What the targets hold changed (a job ended, a backup was deleted): the next
        request scans again, and none is answered from the snapshot taken before."""
        with self._cond:
            self._epoch += 1

    def _key(self) -> Key:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._watched:
            try:
                st = path.stat()  # replaced atomically: a new inode, or a new mtime/size
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                stamps.append(None)
        return self._epoch, tuple(stamps)

    def _expired(self, snap: Snapshot) -> bool:
        ttl = self._ttl_unreachable if snap.unreachable or snap.error else self._ttl
        return time.monotonic() - snap.taken > ttl

    def get(self) -> Snapshot:
        """The current snapshot, scanning first if there is none or it is outdated (see the
        module docstring for who waits). Never raises for unreachable targets: the snapshot
        carries them (:attr:`Snapshot.error`)."""
        deadline = time.monotonic() + WAIT_LIMIT
        with self._cond:
            while True:
                key = self._key()
                snap = self._snap
                current = snap is not None and snap.key == key
                if snap is not None and current and not self._expired(snap):
                    return snap
                if not self._scanning:
                    self._scanning = True
                    break
                if snap is not None and current:
                    return snap  # only aged: the scan under way will replace it
                if not self._cond.wait(timeout=deadline - time.monotonic()) \
                        and time.monotonic() >= deadline:
                    return self._late(snap)
        fresh: Snapshot | None = None
        try:
            fresh = scan(self.ctx, self.redact, key)
            return fresh
        finally:  # a scan that raised (a bug) leaves the old snapshot; a waiter scans again
            with self._cond:
                self._scanning = False
                if fresh is not None:
                    self._snap = fresh
                self._cond.notify_all()

    @staticmethod
    def _late(snap: Snapshot | None) -> Snapshot:
        """What a request answers when the scan under way outlasts :data:`WAIT_LIMIT` (a
        target that stopped answering): the previous snapshot (its ``listed_at`` says how
        old), never a worker thread held for minutes.

        Raises:
            ApiError: 503 ``listing_in_progress`` when there is no snapshot yet.
        """
        if snap is None:
            raise ApiError(503, "listing_in_progress", f"the targets are still being listed "
                           f"(over {WAIT_LIMIT:.0f} s so far); try again shortly")
        log.warning("listing the targets takes over %.0f s: answering the list of %s",
                    WAIT_LIMIT, snap.listed_at)
        return snap

    def targets(self) -> Sequence[str]:
        """The configured target names, in config order."""
        return [t.name for t in self.ctx.config.targets]

    def status(self) -> dict[str, Any]:
        """:func:`health_answer` for the current snapshot, computed at most once per
        :data:`STATUS_TTL` (about 15 ms of CPU at 1,000 backups on three targets).

        Raises:
            ApiError: see :meth:`Snapshot.check`.
        """
        snap = self.get()
        snap.check()
        with self._status_lock:
            cached = self._status
            if cached is not None and cached[0] is snap \
                    and time.monotonic() - cached[1] < STATUS_TTL:
                return cached[2]
            body = health_answer(self.ctx, snap)
            self._status = (snap, time.monotonic(), body)
            return body
