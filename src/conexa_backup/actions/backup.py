"""``backup``: dump the database, archive uploads, store on every target, commit.

Each artifact is produced once and streamed through compression and hashing to all targets
at the same time. The manifest is written last, and only to targets that stored every
artifact: a target that failed holds no manifest, so its partial copy is never taken as good.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from conexa_backup import __version__, archive, postgres, process, signals
from conexa_backup.actions import backup_packs
from conexa_backup.actions.context import Context
from conexa_backup.actions.prune import TargetPrune, candidates
from conexa_backup.actions.prune import problems as prune_problems
from conexa_backup.actions.prune import prune as run_prune
from conexa_backup.catalog import Backup
from conexa_backup.crypto import (
    SIGNATURE_NAME,
    Encryptor,
    fingerprint,
    key_id,
    load_signing_key,
    parse_recipients,
    sign,
)
from conexa_backup.durations import parse_duration
from conexa_backup.errors import (
    ConexaError,
    DatabaseError,
    PartialFailure,
    ProcessError,
    UsageError,
)
from conexa_backup.manifest import (
    ID_FORMAT,
    ID_PATTERN,
    MANIFEST_NAME,
    Artifact,
    DatabaseInfo,
    IndexEntry,
    Manifest,
    SkippedPath,
    UploadsInfo,
    id_sort_key,
    new_backup_id,
)
from conexa_backup.pipeline import (
    CHUNK,
    Compressor,
    HashingSink,
    Sink,
    ThreadedSink,
    copy_stream,
    extension,
)
from conexa_backup.retention import Candidate, would_retain
from conexa_backup.scratch import scratch_name
from conexa_backup.storage.base import Target
from conexa_backup.storage.fanout import MultiUpload

log = logging.getLogger(__name__)
T = TypeVar("T")

PARTS = ("database", "uploads")
HASH_QUEUE_CHUNKS = 2  # compressed chunks waiting to be hashed and stored


@dataclass
class BackupResult:
    manifest: Manifest
    stored_on: list[str]
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why not uploaded there
    pruned: list[TargetPrune] = field(default_factory=list)

    @property
    def prune_errors(self) -> list[str]:
        return prune_problems(self.pruned)

    @property
    def partial(self) -> bool:
        """Stored, but not all was well: a target failed, the backup carries warnings, or the
        prune after it failed. The one rule for the CLI's exit 3, its ``--json`` status and
        the event sent to the notifiers (the API judges a job from that status)."""
        return bool(self.failures or self.warnings or self.prune_errors)

    @property
    def warnings(self) -> list[str]:
        """What the stored backup lacks or looks wrong about (the manifest records it)."""
        return list(self.manifest.warnings)

    @property
    def id(self) -> str:
        return self.manifest.id


class _Progress:
    def __init__(self, out: Sink, ctx: Context) -> None:
        self._out = out
        self._reporter = ctx.reporter

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self._reporter.advance(len(data))
        return len(data)


@dataclass
class _Run:
    ctx: Context
    backup_id: str
    alive: list[Target]
    failures: dict[str, str] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    written: dict[str, list[str]] = field(default_factory=dict)  # target name -> keys stored
    warnings: list[str] = field(default_factory=list)  # recorded in the manifest; exit 3
    # Loaded once, before any work: a bad key must fail the run in its first second.
    recipients: list[Any] = field(default_factory=list)
    signing_key: Any = None
    # The newest complete backup's uploads (id, info): what this run's uploads are held to.
    uploads_before: tuple[str, UploadsInfo] | None = None
    hold_prune: str | None = None  # why this run must not prune older backups
    accept_shrink: bool = False  # the operator says a smaller uploads tree is intended
    rehash: bool = False  # packs: read every file, whatever the file cache says
    existing: list[Backup] = field(default_factory=list)  # what the targets held at the start
    # Called with the targets that committed, once the manifest is written (caches only: a
    # hook must not raise).
    on_commit: list[Callable[[Sequence[str]], None]] = field(default_factory=list)

    def discard(self, targets: Sequence[Target]) -> list[str]:
        """Delete what this run stored on ``targets`` (a failed copy frees its space); return
        the names of the targets where a delete failed (each failure logged). Never raises
        :class:`ConexaError`.

        The manifest (and its signature) go first, on every target, recorded or not: a run
        interrupted while committing may have stored one that was never recorded. Every
        other key was recorded before its upload began (:meth:`upload`).
        """
        commit_keys = [f"{self.backup_id}/{MANIFEST_NAME}", f"{self.backup_id}/{SIGNATURE_NAME}"]
        left = []
        for target in targets:
            keys = commit_keys + [k for k in self.written.pop(target.name, [])
                                  if k not in commit_keys]
            for key in keys:
                try:
                    target.delete(key)
                except ConexaError as exc:
                    log.warning("could not remove %s from %s: %s", key, target.name, exc)
                    if target.name not in left:
                        left.append(target.name)
        return left

    def upload(self, filename: str, feed: Callable[[Sink], T]) -> T:
        """Write ``<id>/<filename>`` to every live target with what ``feed`` writes; targets
        that fail drop out (their error recorded); raises only when every target failed."""
        key = f"{self.backup_id}/{filename}"
        multi: MultiUpload | None = None
        try:
            # Made whole before a signal is raised, so that the except below aborts every
            # upload it began (their temporary files included).
            with signals.held():
                # Recorded as written before a byte is sent, so that :meth:`discard` deletes it
                # wherever it may be whole: a signal can come once a target has it in place
                # (after one target's commit and before the next one's, or as commit
                # returns), and abort() does not undo a commit. Deleting what was never
                # stored is harmless.
                for target in self.alive:
                    self.written.setdefault(target.name, []).append(key)
                multi = MultiUpload(self.alive, key)
            result = feed(multi)
            stored = multi.commit()
        except BaseException:
            if multi is not None:
                multi.abort()
            raise
        finally:
            if multi is not None:
                self.failures.update(multi.failures)
        for name, keys in self.written.items():  # no longer pending where it failed
            if name not in stored and key in keys:
                keys.remove(key)
        self.alive = [t for t in self.alive if t.name in stored]
        return result

    def _encode(self, produce: Callable[[Sink], T], out: Sink) -> T:
        """Run ``produce`` into compression (then encryption, if configured) writing to
        ``out``; on failure the encryptor is stopped before the error propagates."""
        encryptor = Encryptor(self.recipients, out) if self.recipients else None
        try:
            compressor = Compressor(self.ctx.config.compression, encryptor or out)
            result = produce(compressor)
            compressor.finish()
            if encryptor is not None:
                encryptor.finish()
        except BaseException:
            if encryptor is not None:
                encryptor.abort()
            raise
        return result

    def store(self, kind: str, name: str, content: str, produce: Callable[[Sink], T]) -> T:
        """Stream ``produce``'s bytes, compressed, (encrypted,) hashed, to every live target."""
        algorithm = self.ctx.config.compression.algorithm
        recipients = self.ctx.config.encryption.recipients
        filename = name + extension(algorithm) + (".age" if recipients else "")
        hashing: list[HashingSink] = []

        def feed(multi: Sink) -> T:
            hashing.append(HashingSink(_Progress(multi, self.ctx)))
            # Hashing the stored bytes and handing them to the targets run in a thread of
            # their own, beside the producer's reading and compressing.
            with ThreadedSink(hashing[0], "hash-and-store", HASH_QUEUE_CHUNKS) as behind:
                return self._encode(produce, behind)

        result = self.upload(filename, feed)
        self.artifacts.append(Artifact(
            name=filename, kind=kind, size=hashing[0].size,  # type: ignore[arg-type]
            sha256=hashing[0].hexdigest(), compression=algorithm, content=content,
            encryption="age" if recipients else None,
            recipients=[fingerprint(r) for r in recipients],
        ))
        return result


def _dump_database(ctx: Context, out: Sink) -> DatabaseInfo:
    """pg_dump in an exported snapshot; row counts taken in that same snapshot meanwhile.

    One job: a custom-format archive streamed from pg_dump's stdout. Several (``dump_jobs``):
    a directory-format dump by parallel workers into ``state_dir/staging``, then that folder
    as a tar stream; pg_restore reads either one, in parallel.
    """
    info = ctx.db
    full_version, dump_major = postgres.tool_version(info, "pg_dump")
    with postgres.exported_snapshot(info) as snap:
        if dump_major < snap.server.major:
            raise ConexaError(
                f"pg_dump {full_version} is older than the server ({snap.server.version}); "
                "install a pg_dump of the server's major version or newer, or set "
                "database.bin_dir"
            )
        counted: dict[str, Any] = {}
        stop = threading.Event()

        def count() -> None:
            try:
                counted["rows"] = postgres.row_counts(snap.conn, _lock_wait(ctx), stop)
                counted["objects"] = postgres.schema_objects(snap.conn)
            except postgres.TableLockTimeout as exc:  # named now, while the lock is held
                counted["error"] = postgres.lock_wait_error(
                    info, exc.table, ctx.config.database.lock_wait_timeout, "counting rows")
            except Exception as exc:  # reported by the main thread below
                counted["error"] = exc

        counter = threading.Thread(target=count, name="row-counts", daemon=True)
        signals.start(counter)
        try:
            _pg_dump(ctx, snap.id, out)
        except BaseException:
            _stop_counting(counter, snap.conn, stop)  # the connection is about to close
            raise
        finally:
            counter.join()
        error = counted.get("error")
        if isinstance(error, DatabaseError):
            raise error
        if error is not None:
            raise ConexaError(f"counting rows failed: {error}")
        server = snap.server
    return DatabaseInfo(
        name=info.dbname, server_version=server.version, pg_dump_version=full_version,
        encoding=server.encoding, collate=server.collate, ctype=server.ctype,
        owner=server.owner, locale_provider=server.locale_provider,
        icu_locale=server.icu_locale, tables=counted["rows"], objects=counted["objects"],
    )


def _pg_dump(ctx: Context, snapshot_id: str, out: Sink) -> None:
    """pg_dump in the snapshot: one job streamed, or several into a directory.

    Raises:
        DatabaseError: pg_dump waited ``lock_wait_timeout`` for a table lock (naming the
        session that holds it). ProcessError: pg_dump failed otherwise.
    """
    jobs = ctx.config.database.dump_jobs
    try:
        if jobs > 1:
            _dump_directory(ctx, snapshot_id, jobs, out)
        else:
            _dump_custom(ctx, snapshot_id, out)
    except ProcessError as exc:
        blocked = postgres.lock_timeout_error(ctx.db, exc.stderr_tail,
                                              ctx.config.database.lock_wait_timeout)
        if blocked is None:
            raise
        raise blocked from None


def _lock_wait(ctx: Context) -> timedelta:
    return parse_duration(ctx.config.database.lock_wait_timeout)


def _stop_counting(counter: threading.Thread, conn: Any, stop: threading.Event) -> None:
    """Stop the row-count thread: it checks ``stop`` before each query, and the query it
    runs is cancelled, again until the thread ends (a cancel that reaches the server just
    before the thread's next query starts cancels nothing; on a large table that query
    would otherwise run for minutes after the run was interrupted)."""
    stop.set()
    while counter.is_alive():
        with contextlib.suppress(Exception):  # a failed cancel: the next round tries again
            conn.cancel_safe(timeout=5)
        counter.join(0.2)


def _dump_custom(ctx: Context, snapshot_id: str, out: Sink) -> None:
    info = ctx.db
    with process.stream(postgres.pg_dump_argv(info, snapshot_id, _lock_wait(ctx)),
                        env=info.env(), what="pg_dump") as child:
        _grow_pipe(child.stdout)
        copy_stream(io.BufferedReader(child.stdout, CHUNK), out)  # type: ignore[type-var]
        child.wait_ok()


# pg_dump --verbose, in the C locale: a worker finished the data of TOC entry N (file N.dat).
# Table names appear raw in other messages and may even hold a newline, so a line can be
# forged by whoever names a table: move_file(only_if_closed=True) is what makes an early move
# safe; the pattern only keeps the attempts few.
FINISHED_ITEM = re.compile(r"^pg_dump: finished item (\d+) TABLE DATA ")


def _dump_directory(ctx: Context, snapshot_id: str, jobs: int, out: Sink) -> None:
    """Parallel directory-format dump, archived while it is written.

    Each table's file goes into the tar as soon as pg_dump reports that its worker finished it
    and no process still has it open for writing, and is deleted then: compression overlaps
    the dump, and staging holds only the files in flight. ``toc.dat`` (written last) and
    anything not moved early (large objects) follow at the end. A missed report costs only
    overlap, never data: the final sweep takes everything left.

    Raises:
        ProcessError: pg_dump failed. ConexaError: its output folder holds something other
        than regular files, or cannot be read.
    """
    info = ctx.db
    folder = ctx.state_dir("staging") / scratch_name(f"dump-{secrets.token_hex(3)}")
    folder.mkdir(mode=0o700)
    argv = postgres.pg_dump_directory_argv(info, snapshot_id, jobs, folder, _lock_wait(ctx))
    try:
        with archive.tar_writer(out, folder) as tar:
            with process.watch(argv, FINISHED_ITEM, env={**info.env(), "LC_ALL": "C"},
                               what="pg_dump") as child:
                for item in child.matches():
                    archive.move_file(tar, folder / f"{item[1]}.dat", only_if_closed=True)
                child.wait_ok()
            for name in sorted(os.listdir(folder)):
                if not archive.move_file(tar, folder / name):
                    raise ConexaError(f"pg_dump left {name!r}, not a regular file, in {folder}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _grow_pipe(stream: Any) -> None:
    """Ask for a 1 MiB pipe so pg_dump blocks less often (best effort, Linux only)."""
    import fcntl

    with contextlib.suppress(OSError, ValueError, AttributeError):
        fcntl.fcntl(stream.fileno(), 1031, CHUNK)  # F_SETPIPE_SZ


def _dump_globals(ctx: Context, out: Sink) -> None:
    info = ctx.db
    with info.connect() as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    superuser = bool(row and row[0])  # a plain catalog read: any role may run it
    argv = postgres.pg_dumpall_globals_argv(info, superuser)
    with process.stream(argv, env=info.env(info.maintenance_db), what="pg_dumpall") as child:
        copy_stream(child.stdout, out)
        child.wait_ok()


def run_backup(
    ctx: Context,
    *,
    kind: str = "scheduled",
    parts: Sequence[str] = PARTS,
    target_names: Sequence[str] | None = None,
    prune: bool = True,
    accept_shrink: bool = False,
    backup_id: str | None = None,
    rehash: bool = False,
    allow_clock_skew: bool = False,
) -> BackupResult:
    """Make one backup of ``parts`` on the selected targets. The caller holds the run lock.

    Its id is ``backup_id`` when given (chosen ahead by :func:`next_id`, so that the API
    can answer it before the run starts), else the start time's (:func:`next_id`'s rule).

    With ``[uploads] format = "packs"``, only what a target lacks is stored there
    (:mod:`backup_packs`); ``rehash`` reads every file whatever the file cache says.

    An uploads folder that is empty or shrank by more than ``max_shrink`` since the last
    trusted backup is stored with a warning and holds pruning back, unless ``accept_shrink``.

    A target whose retention would not keep this backup (a monthly tier mid-month) is skipped;
    if every target it is sent to fails, it is sent to the skipped ones after all (a partial
    run). A backup whose id would sort before the newest complete backup (the host's clock
    stepped back) is refused, unless ``allow_clock_skew`` (or a restore's safety backup,
    which must never block a restore: it is logged). Whatever a failed run stored is removed
    again (it has no manifest and would only take space); earlier backups are never touched.
    With ``prune``, each target that stored the backup is then pruned by its policy
    (``prune_after_backup``); a target where the backup failed is never pruned in that run.

    Raises:
        UsageError: ``backup_id`` is not an id, or a backup already has it; the clock is
            behind the newest complete backup (:func:`check_clock`).
        ConexaError: nothing usable was stored (every target failed, pg_dump failed...).
        PartialFailure: stored and committed on some targets only (see ``.result``).
    """
    started = datetime.now(UTC)
    t0 = time.monotonic()
    targets = ctx.targets(target_names)
    for target in targets:  # temporaries of runs killed outright (local targets only)
        sweep = getattr(target, "sweep_temporaries", None)
        if callable(sweep) and sweep():
            log.info("removed stale temporary files from %s", target.name)
    unreachable: dict[str, str] = {}
    existing = ctx.scan(targets, unreachable=unreachable)
    backup_id = _claim_id(backup_id, {b.id for b in existing}) if backup_id \
        else new_backup_id(started, {b.id for b in existing})
    check_clock(backup_id, existing, allowed=allow_clock_skew or kind == "safety")
    reachable = [t for t in targets if t.name not in unreachable]
    skipped = _not_retained(ctx, reachable, existing, Candidate(backup_id, True, kind))
    setup = _Setup(backup_id, existing, accept_shrink, rehash)
    run = setup.run(ctx, [t for t in reachable if t.name not in skipped], unreachable)
    try:
        manifest, stored = _store(ctx, run, kind, parts, started, targets)
    except ConexaError:
        fallback = [t for t in reachable if t.name in skipped]
        if not fallback or not run.failures.keys() >= {t.name for t in run.alive}:
            raise
        # Every target the policy chose failed; the archive tiers it skipped are healthy as
        # far as anyone knows. A backup stored where retention would not pick it is better
        # than none (the README: "the backup goes everywhere anyway").
        log.warning("every target chosen for backup %s failed (%s); sending it to the "
                    "targets its retention skipped: %s", backup_id, ", ".join(run.failures),
                    ", ".join(t.name for t in fallback))
        run = setup.run(ctx, fallback, {**unreachable, **run.failures})
        skipped = {}
        manifest, stored = _store(ctx, run, kind, parts, started, targets)
    for hook in run.on_commit:
        hook(stored)
    result = BackupResult(manifest, stored, run.failures, time.monotonic() - t0, skipped)
    log.info("backup %s complete on %s (%d bytes, %.1f s)", run.backup_id, ", ".join(stored),
             manifest.size_bytes, result.seconds)
    if prune:
        try:
            result.pruned = _prune_after(ctx, run, stored)
        except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: the backup itself is done
            exc.add_note(f"backup {run.backup_id} is complete on {', '.join(stored)} and "
                         "kept; the prune after it was interrupted (the next one finishes it)")
            raise
    if run.failures:
        failed = "; ".join(run.failures.values())
        raise PartialFailure(f"backup {run.backup_id} is complete on {', '.join(stored)} "
                             f"but failed on: {failed}", result=result)
    return result


@dataclass
class _Setup:
    """What every attempt at storing one backup shares (see :meth:`run`)."""

    backup_id: str
    existing: list[Backup]
    accept_shrink: bool
    rehash: bool

    def run(self, ctx: Context, alive: Sequence[Target], failed: dict[str, str]) -> _Run:
        """A new run sending this backup to ``alive``; ``failed``: targets already out."""
        enc, signing = ctx.config.encryption, ctx.config.signing
        run = _Run(ctx, self.backup_id, list(alive), dict(failed),
                   recipients=parse_recipients(enc.recipients) if enc.recipients else [],
                   signing_key=load_signing_key(signing.key_file) if signing.key_file else None)
        run.uploads_before, run.accept_shrink = _uploads_before(self.existing), self.accept_shrink
        run.rehash, run.existing = self.rehash, self.existing
        log.info("backup %s started on %s", self.backup_id, ", ".join(t.name for t in alive))
        return run


def _store(ctx: Context, run: _Run, kind: str, parts: Sequence[str], started: datetime,
           targets: Sequence[Target]) -> tuple[Manifest, list[str]]:
    """Produce and commit the backup on ``run``'s targets: (its manifest, where it is
    complete). On any failure nothing of this run stays on ``targets`` (no manifest
    anywhere); on success what targets that failed hold of it is removed."""
    try:
        manifest = _produce(ctx, run, kind, parts, started)
        ctx.reporter.step("writing manifest")
        stored = _commit(run, manifest)
    except BaseException as exc:
        left = run.discard(targets)  # no manifest anywhere: nothing of this run may linger
        if left:  # said with the error, or "partial work was removed" would not be true
            exc.add_note(f"backup {run.backup_id} may be left incomplete on "
                         f"{', '.join(left)}: removing it failed (see the log; prune removes "
                         "incomplete backups once a day old)")
        raise
    run.discard([t for t in targets if t.name not in stored])
    return manifest, stored


def check_clock(backup_id: str, existing: Sequence[Backup], *, allowed: bool) -> None:
    """Refuse an id that would sort before the newest complete backup: the host's clock was
    stepped back (or the backup would be filed in the past, ``latest`` would still name the
    older one, and once the clock is fixed prune would take it for the oldest). ``allowed``:
    log it and go on.

    Raises:
        UsageError: the id's time is before the newest complete backup's (both named).
    """
    newest = next((b for b in reversed(existing) if b.complete_copies), None)
    if newest is None or id_sort_key(backup_id) > id_sort_key(newest.id):
        return
    message = (f"this host's clock ({_id_time(backup_id)}) is behind the newest backup, "
               f"{newest.id} ({_id_time(newest.id)}): this backup would be filed before it")
    if allowed:
        log.warning("%s (allowed)", message)
        return
    raise UsageError(message, hint="fix the clock (NTP, `timedatectl`), or pass "
                     "--allow-clock-skew to store it anyway")


def _id_time(backup_id: str) -> str:
    """A backup id's time as people read it: ``2026-12-05 00:00:00 UTC``."""
    at = datetime.strptime(backup_id.partition("-")[0], ID_FORMAT).replace(tzinfo=UTC)
    return f"{at:%Y-%m-%d %H:%M:%S} UTC"


def next_id(ctx: Context, when: datetime) -> str:
    """The id a backup started at ``when`` gets: its UTC second, ``-N`` if a backup on a
    reachable target already has it (:func:`manifest.new_backup_id`).

    Raises:
        StorageError: no target could be listed.
    """
    taken = {b.id for b in ctx.scan(ctx.targets(), with_manifests=False, unreachable={})}
    return new_backup_id(when, taken)


def _claim_id(wanted: str, taken: set[str]) -> str:
    """``wanted`` as this run's id. Raises UsageError: not an id, or already taken (another
    run stored it between :func:`next_id` and this run's start: never a second copy)."""
    if not ID_PATTERN.fullmatch(wanted):
        raise UsageError(f"not a backup id: {wanted[:80]!r}")
    if wanted in taken:
        raise UsageError(f"backup id {wanted} is already taken")
    return wanted


def _prune_after(ctx: Context, run: _Run, stored: Sequence[str]) -> list[TargetPrune]:
    """Prune the targets that stored this backup and have ``prune_after_backup``; none when
    the run holds pruning back (a suspicious uploads folder): the backups that pruning would
    delete may be the last good ones."""
    auto = [n for n in stored if ctx.config.retention_for(n).prune_after_backup]
    if run.hold_prune is not None:
        for name in auto:
            log.warning("not pruning %s: %s", name, run.hold_prune)
        return [TargetPrune(name, skipped=run.hold_prune) for name in auto]
    try:
        return run_prune(ctx, auto, skip=run.failures) if auto else []
    except ConexaError as exc:  # the backup is complete: a failed prune does not undo it
        return [TargetPrune(name, errors=[str(exc)]) for name in auto]


def _uploads_before(existing: Sequence[Backup]) -> tuple[str, UploadsInfo] | None:
    """The newest complete backup whose uploads are trusted: (its id, what its manifest says).

    A backup that was itself suspect (empty or shrunken) is passed over, so an unmounted
    volume keeps warning (and holding pruning back) every night until it is mounted again or
    the operator accepts the smaller tree (``backup --accept-shrink``)."""
    for backup in reversed(existing):  # newest first: the nearest trusted yardstick
        manifest = backup.manifest
        if manifest is not None and manifest.uploads is not None \
                and manifest.uploads.suspect is None:
            return backup.id, manifest.uploads
    return None


def _check_uploads_shrink(run: _Run, now: UploadsInfo, max_shrink: float) -> UploadsInfo:
    """``now``, marked suspect when the folder looks wrong (:func:`shrink_warning`): the run
    is then partial (exit 3) and holds pruning back, since the usual cause is a volume that
    is not mounted and pruning would delete the backups that still hold the files. With
    ``accept_shrink`` the smaller tree is taken as intended (logged) and trusted from now on."""
    warning = shrink_warning(now, run.uploads_before, max_shrink)
    if warning is None:
        return now
    if run.accept_shrink:
        log.warning("accepted with --accept-shrink: %s", warning)
        return now
    run.warnings.append(warning + " (older backups are not pruned by this run; "
                        "`backup --accept-shrink` once if the change is intended)")
    run.hold_prune = "the uploads folder looked empty or shrunken (see the backup's warnings)"
    return now.model_copy(update={"suspect": warning})


def shrink_warning(now: UploadsInfo, before: tuple[str, UploadsInfo] | None,
                   max_shrink: float) -> str | None:
    """Why ``now`` looks wrong: the folder is empty, or its file count or bytes fell by more
    than ``max_shrink`` (a share) since ``before`` (a backup id and its uploads); else None."""
    if now.files == 0:
        return f"the uploads folder {now.path} is empty; is its volume mounted?"
    if before is None:
        return None
    before_id, old = before
    drops = [f"{what} {was:,} -> {is_:,}" for what, was, is_ in (
        ("files", old.files, now.files), ("bytes", old.bytes, now.bytes))
        if was > 0 and (was - is_) / was > max_shrink]
    if not drops:
        return None
    return (f"the uploads folder {now.path} shrank by more than {max_shrink:.0%} since backup "
            f"{before_id} ({', '.join(drops)}); is its volume mounted?")


def _not_retained(ctx: Context, targets: Sequence[Target], existing: Sequence[Backup],
                  new: Candidate) -> dict[str, str]:
    """Archive tiers whose retention would not keep ``new``: it is not uploaded there.

    Only pure period tiers (weekly/monthly/yearly rules, no keep_last, keep_within,
    keep_hourly or keep_daily) are skipped: a tier that keeps recent backups keeps this one
    too, at least as its newest. If every target would be skipped, the first one still gets
    it: a run never stores nothing.
    """
    skipped = {}
    for target in targets:
        policy = ctx.config.retention_for(target.name).policy()
        cands, _ = candidates(existing, target.name)
        if policy.period_tier and not would_retain(cands, new, policy):
            skipped[target.name] = ("not for this archive tier: its retention keeps the first "
                                    "backup of each period, and this period already has one")
    if targets and len(skipped) == len(targets):
        skipped.pop(targets[0].name)
    for name, why in skipped.items():
        log.info("not uploading to %s: %s", name, why)
    return skipped


def _produce(ctx: Context, run: _Run, kind: str, parts: Sequence[str],
             started: datetime) -> Manifest:
    """Store every artifact of ``parts``; return the manifest describing them."""
    database = uploads = None
    if "database" in parts:
        ctx.reporter.step("dumping database")
        directory = ctx.config.database.dump_jobs > 1
        database = run.store("database", "database.dir.tar" if directory else "database.dump",
                             "pg_dump-directory" if directory else "pg_dump-custom",
                             lambda out: _dump_database(ctx, out))
        if ctx.config.database.globals:
            ctx.reporter.step("dumping roles and tablespaces")
            run.store("globals", "globals.sql", "sql", lambda out: _dump_globals(ctx, out))
    if "uploads" in parts and ctx.config.uploads is not None:
        ctx.reporter.step("archiving uploads")
        uploads = _check_uploads_shrink(run, _store_uploads(ctx, run, ctx.config.uploads.path),
                                        ctx.config.uploads.max_shrink)
    return Manifest(
        id=run.backup_id, kind=kind, tool_version=__version__,  # type: ignore[arg-type]
        hostname=socket.gethostname(), started_at=started, finished_at=datetime.now(UTC),
        database=database, uploads=uploads, artifacts=run.artifacts,
        warnings=run.warnings,
        signed_by=key_id(run.signing_key.public_key()) if run.signing_key is not None else None,
    )


def _store_uploads(ctx: Context, run: _Run, root: Path) -> UploadsInfo:
    """The uploads, as ``[uploads] format`` says (a tar, or packs), and their index.

    Entries skipped (unreadable, or kinds no restore recreates) are recorded in the manifest
    and make the run partial: one bad file never costs the database backup.
    """
    assert ctx.config.uploads is not None
    if ctx.config.uploads.format == "packs":
        stats, how = backup_packs.store_uploads(ctx, run, root, rehash=run.rehash)
    else:
        stats, how = _store_tar(ctx, run, root), {}
    skipped = stats.skipped
    if skipped.count:
        named = ", ".join(f"{path} ({why})" for path, why in skipped.listed[:3])
        more = f" and {skipped.count - 3} more" if skipped.count > 3 else ""
        run.warnings.append(f"uploads: {skipped.count} entr{'y' if skipped.count == 1 else 'ies'}"
                            f" not backed up: {named}{more} (listed in the manifest)")
    return UploadsInfo(path=str(root), files=stats.files, bytes=stats.bytes,
                       dirs=stats.dirs, symlinks=stats.symlinks, skipped=skipped.count,
                       skipped_paths=[SkippedPath(path=p, reason=r) for p, r in skipped.listed],
                       **how)


def _store_tar(ctx: Context, run: _Run, root: Path) -> archive.TreeStats:
    """The uploads tar, then its index: every file's path, size and SHA-256 and every
    symlink's target (JSON lines), so that a restore drill can prove each came back. The
    index is spooled (memory up to 1 MiB, then ``state_dir/staging``) while the tar streams.
    """
    with tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+b",
                                       dir=str(ctx.state_dir("staging"))) as index:
        def record(entry: IndexEntry) -> None:
            index.write(entry.to_line())

        stats = run.store("uploads", "uploads.tar", "tar",
                          lambda out: archive.write_tree(root, out, record))
        index.seek(0)
        run.store("uploads-index", "uploads.index.jsonl", "jsonl",
                  lambda out: copy_stream(index, out))
    return stats


def _commit(run: _Run, manifest: Manifest) -> list[str]:
    """Write the manifest (the commit marker) to every target that holds all artifacts,
    preceded by its signature when ``[signing]`` has a key."""
    data = manifest.to_json()
    if run.signing_key is not None:
        signature = sign(data, run.signing_key)
        run.upload(SIGNATURE_NAME, lambda out: out.write(signature))
    run.upload(MANIFEST_NAME, lambda out: out.write(data))
    return [t.name for t in run.alive]
