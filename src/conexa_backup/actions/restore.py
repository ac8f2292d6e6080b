"""``restore``: put a backup back without ever leaving the live system half-restored.

Order of work: pick the backup; take a safety backup of whatever will be replaced; restore the
database into a fresh database and the uploads into a hidden sibling folder, both checked
against the manifest; only then swap them in (uploads first, undone if the database swap is
refused). Nothing live is touched until everything restored has been proven.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from conexa_backup import signals
from conexa_backup.actions import journal, leftovers, preflight, restore_db, restore_uploads
from conexa_backup.actions.backup import run_backup
from conexa_backup.actions.context import Context
from conexa_backup.catalog import Backup, Use
from conexa_backup.errors import PartialFailure, UsageError
from conexa_backup.manifest import ID_FORMAT, Manifest

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RestoreOptions:
    ref: str = "latest"
    to_database: str | None = None
    uploads_to: Path | None = None
    only: Literal["database", "uploads"] | None = None
    safety_backup: bool = True
    source: str | None = None  # restore --from NAME


@dataclass
class RestoreResult:
    backup_id: str
    database: str | None = None  # where the database now is
    previous_database: str | None = None  # the replaced live database, kept
    uploads: Path | None = None
    previous_uploads: Path | None = None
    safety_backup_id: str | None = None
    seconds: float = 0.0
    # Damaged copies passed over for a good one: which, and why (stderr and the event).
    fallbacks: list[str] = field(default_factory=list)
    # What was read (artifact names; "packs/" for a packs backup's blobs) -> from which target.
    read_from: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    backup: Backup
    manifest: Manifest
    database: str | None  # target database name, or None
    uploads: Path | None  # target folder, or None
    in_place_db: bool
    in_place_uploads: bool


def _plan(ctx: Context, opts: RestoreOptions, notes: list[str]) -> _Plan:
    # A suspect backup's dump is fine, only its uploads are in doubt (catalog.Use).
    use = Use.DATABASE if opts.only == "database" else Use.RESTORE
    backup = ctx.resolve(opts.ref, opts.source, notes, use=use)
    manifest = backup.manifest
    assert manifest is not None
    want_db = opts.only in (None, "database") and manifest.artifact("database") is not None
    want_up = opts.only in (None, "uploads") and restore_uploads.has_uploads(manifest)
    if opts.only and not (want_db or want_up):
        raise UsageError(f"backup {backup.id} holds no {opts.only}")
    database = uploads = None
    if want_db:
        database = opts.to_database or ctx.db.dbname
        if opts.to_database and restore_db.database_exists(ctx.db, opts.to_database):
            raise UsageError(f"--to-database {opts.to_database!r} already exists; "
                             "choose a new name (it is never overwritten)")
    if want_up:
        if opts.uploads_to is not None:
            restore_uploads.check_destination(opts.uploads_to)
            uploads = opts.uploads_to
        elif ctx.config.uploads is not None:
            uploads = ctx.config.uploads.path
            if uploads.is_symlink():  # backed up as the folder it points to: restored there
                uploads = uploads.resolve()
        else:
            raise UsageError("no [uploads] path configured: pass --uploads-to DIR "
                             "or --only database")
    return _Plan(backup, manifest, database, uploads,
                 in_place_db=want_db and opts.to_database is None,
                 in_place_uploads=want_up and opts.uploads_to is None)


def _preflight(ctx: Context, plan: _Plan, opts: RestoreOptions) -> None:
    """Check what the restore needs before the safety backup (:mod:`preflight`)."""
    live = plan.database if plan.in_place_db else None
    if live is not None and not restore_db.database_exists(ctx.db, live):
        live = None
    preflight.check_restore(ctx, plan.manifest, database=plan.database, uploads=plan.uploads,
                            replaces=live, safety_dump=opts.safety_backup and live is not None)


def _safety_backup(ctx: Context, plan: _Plan) -> str | None:
    """Back up what the restore will replace (parts that exist now)."""
    parts = []
    if plan.in_place_db and restore_db.database_exists(ctx.db, ctx.db.dbname):
        parts.append("database")
    if plan.in_place_uploads and plan.uploads is not None and plan.uploads.exists():
        parts.append("uploads")
    if not parts:
        return None
    ctx.reporter.step("taking a safety backup of the live " + " and ".join(parts))
    try:
        return run_backup(ctx, kind="safety", parts=parts, prune=False).id
    except PartialFailure as exc:  # a dead offsite target must not block a restore
        log.warning("safety backup incomplete: %s", exc)
        result = exc.result
        return str(getattr(result, "id", "")) or None


def run_restore(ctx: Context, opts: RestoreOptions) -> RestoreResult:
    """Restore as ``opts`` says. The caller holds the run lock.

    Raises:
        UsageError: no such backup, or a destination that must not be overwritten.
        PreflightError: this host lacks what the restore needs (an identity that fits, a
        tool, CREATEDB, room): found before any work, the safety backup included.
        IntegrityError: every copy of the backup is damaged or missing ("no good copy").
        UnusableCopyError: no copy could be restored, some being intact (each one's reason).
        ProcessError/DatabaseError: pg_restore or the server refused; nothing live changed.
    """
    t0 = time.monotonic()
    passed: list[str] = []  # newer backups ``latest`` passed over (damaged or suspect)
    plan = _plan(ctx, opts, passed)
    result = RestoreResult(plan.backup.id, fallbacks=passed)
    stamp = datetime.now(UTC).strftime(ID_FORMAT)
    _preflight(ctx, plan, opts)
    if opts.safety_backup and (plan.in_place_db or plan.in_place_uploads):
        result.safety_backup_id = _safety_backup(ctx, plan)

    restored_db: str | None = None
    staged_uploads: Path | None = None
    # Recorded before they exist: a run killed while loading or extracting leaves them to the
    # next locked run (leftovers.sweep). A database restored side by side is named by the
    # user, not by us: it is not recorded (see README, "How a restore works").
    loading = _restoring_name(plan)
    record = leftovers.claim(
        ctx.config.state_dir, "restore", databases=[("db", loading)] if loading else [],
        folders=[restore_uploads.staging_path(plan.uploads, plan.backup.id)]
        if plan.uploads is not None else [])
    try:
        if plan.database is not None:
            restored_db = _prepare_database(ctx, plan, opts, result, loading)
        if plan.uploads is not None:
            ctx.reporter.step("extracting uploads")
            staged_uploads = restore_uploads.extract(ctx, plan.backup, plan.uploads,
                                                     opts.source, result.fallbacks,
                                                     result.read_from)
        with signals.held():  # the swap itself is never interrupted half-way
            _swap(ctx, plan, restored_db, staged_uploads, stamp, result)
    except BaseException:
        if restored_db is not None and result.database is None:
            restore_db.drop_database(ctx.db, restored_db)
        if staged_uploads is not None and staged_uploads.exists():
            restore_uploads.remove_tree(staged_uploads)
        raise
    finally:
        # Whatever is still there under the recorded names (a signal between CREATE DATABASE
        # and the line that would have noted it); swapped in, they no longer exist.
        leftovers.settle(record, leftovers.servers_of(ctx))
    result.seconds = time.monotonic() - t0
    log.info("restore of %s finished in %.1f s", plan.backup.id, result.seconds)
    return result


def _restoring_name(plan: _Plan) -> str | None:
    """The database an in-place restore loads, ``<db>__restoring_<id>_p<pid>`` (whose it is:
    the leftovers record says the rest); None when the database is not restored in place."""
    if plan.database is None or not plan.in_place_db:
        return None
    return restore_db.derived_name(plan.database,
                                   f"__restoring_{plan.backup.id}_p{os.getpid()}")


def _prepare_database(ctx: Context, plan: _Plan, opts: RestoreOptions,
                      result: RestoreResult, loading: str | None) -> str:
    """Restore into the final name (side by side) or ``loading`` (in place)."""
    assert plan.database is not None and plan.manifest.database is not None
    name = loading or plan.database
    if plan.in_place_db:
        # Versions before leftovers records named it without the pid, and never removed it
        # unless the same backup was restored again; the run lock says it is no one's now.
        restore_db.drop_database(ctx.db, restore_db.derived_name(
            plan.database, f"__restoring_{plan.backup.id}"))
    ctx.reporter.step("fetching database dump")
    dump = restore_db.fetch_dump(ctx, plan.backup, opts.source, result.fallbacks,
                                 result.read_from)
    try:
        ctx.reporter.step(f"restoring database into {name!r}")
        restore_db.restore_into(ctx.db, dump, plan.manifest.database, name)
    finally:
        dump.discard()
    return name


def _swap(ctx: Context, plan: _Plan, restored_db: str | None, staged: Path | None,
          stamp: str, result: RestoreResult) -> None:
    """Swap the proven copies in. A journal in ``state_dir`` records the swap while it runs,
    so that a crash half-way is finished or undone by the next run (``journal.recover``)."""
    keep: Path | None = None
    keep_db: str | None = None
    if staged is not None and plan.uploads is not None and plan.in_place_uploads:
        base = plan.uploads
        keep = _first_free(
            lambda n: base.with_name(f"{base.name}.before-restore-{stamp}{_n(n, '-')}"),
            Path.exists)
    if restored_db is not None and plan.database is not None and plan.in_place_db:
        live = plan.database
        keep_db = _first_free(
            lambda n: restore_db.derived_name(live, f"__before_restore_{stamp}{_n(n, '_')}"),
            lambda name: restore_db.database_exists(ctx.db, name))
    if keep is not None or keep_db is not None:
        journal.begin(ctx.config.state_dir, uploads=plan.uploads if keep else None,
                      staged=staged if keep else None, kept_uploads=keep,
                      live_db=plan.database if keep_db else None, restored_db=restored_db,
                      keep_db=keep_db)
    if staged is not None and plan.uploads is not None:
        if keep is not None:
            ctx.reporter.step("swapping in restored uploads")
            result.previous_uploads = restore_uploads.swap_in(staged, plan.uploads, keep)
        else:
            if plan.uploads.exists():
                plan.uploads.rmdir()  # checked empty by check_destination
            staged.rename(plan.uploads)
        result.uploads = plan.uploads
    if restored_db is not None and plan.database is not None:
        if keep_db is not None:
            ctx.reporter.step("swapping in restored database")
            try:
                result.previous_database = restore_db.swap_in(
                    ctx.db, plan.database, restored_db, keep_db)
            except BaseException:
                if result.previous_uploads is not None and plan.uploads is not None:
                    _undo_uploads(plan.uploads, result.previous_uploads)
                    result.previous_uploads = None
                journal.end(ctx.config.state_dir)
                raise
        result.database = plan.database
    journal.end(ctx.config.state_dir)


def _n(n: int, sep: str) -> str:
    return f"{sep}{n}" if n else ""


def _first_free(make: Callable[[int], T], taken: Callable[[T], bool]) -> T:
    """``make(0)``, or ``make(1)``... : the first name not yet taken (two restores a second)."""
    return next(name for name in map(make, itertools.count()) if not taken(name))


def _undo_uploads(dest: Path, kept: Path) -> None:
    """Put the previous uploads back after a refused database swap."""
    restored = dest.with_name(f".{dest.name}.undone-restore")
    kept.rename(restored)
    restore_uploads.swap_in(restored, dest, kept)  # the previous tree back at dest, atomically
    restore_uploads.remove_tree(kept)  # now the restored tree, which was not used
