"""Garbage collection of packs, run by ``prune`` after a target's manifests were deleted.

Per target (docs/packs.md, "Garbage collection"): the cache of what the target holds is
brought up to its listing; the blobs still referenced are those of every packs-format backup
with a manifest there (each backup's sorted ``refs`` file, merged into a temporary SQLite
table in ``state_dir/staging``: memory flat in the number of blobs). Then, among packs older
than the grace period (by the listing's modified time):

- a pack with no referenced blob is deleted;
- a pack whose unreferenced share of content exceeds the threshold is repacked: its
  referenced blobs that no other surviving pack on the target holds are written into new
  packs, uploaded and recorded first; only then is the old pack deleted.

Crash safety: every deletion comes after every upload it depends on, and a blob is dropped
only from a pack whose referenced blobs all live in another pack the target lists. A run
killed anywhere leaves every listed-complete backup whole; the next prune finishes the job
(the listing, not this host's cache, says what the target holds).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sqlite3
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from conexa_backup import packs
from conexa_backup.actions import backup_packs
from conexa_backup.actions.context import Context
from conexa_backup.actions.fetch import from_first_good
from conexa_backup.actions.restore_packs import read_index
from conexa_backup.blobindex import BlobIndex, merged
from conexa_backup.catalog import Backup, Copy
from conexa_backup.crypto import parse_recipients
from conexa_backup.durations import parse_duration
from conexa_backup.errors import ConexaError, IntegrityError, StorageError, UnusableCopyError
from conexa_backup.manifest import IndexEntry, Manifest
from conexa_backup.pipeline import CHUNK, copy_stream
from conexa_backup.scratch import scratch_name
from conexa_backup.storage.base import Target

log = logging.getLogger(__name__)

DEFAULT_GRACE = "24h"
DEFAULT_THRESHOLD = 0.3
_CACHE_KIB = 8192  # SQLite's page cache for the referenced set, at most
_MERGE_FILES = 200  # refs files open at once (a year of hourly backups must not hit ulimit)


@dataclass
class GcReport:
    """What garbage collection did (or, in a dry run, would do) on one target."""

    deleted: list[str] = field(default_factory=list)  # packs no backup references
    deleted_bytes: int = 0  # their stored size
    repacked: list[str] = field(default_factory=list)  # packs rewritten without dead blobs
    repacked_bytes: int = 0  # their stored size
    written: list[str] = field(default_factory=list)  # the new packs repacking wrote
    written_bytes: int = 0
    freed: int = 0  # bytes freed (a dry run: estimated from the unreferenced share)
    waiting: int = 0  # unreferenced packs still inside the grace period, kept for now
    skipped: str | None = None  # why no pack was collected on this target
    notes: list[str] = field(default_factory=list)  # warnings: what GC left alone and why
    errors: list[str] = field(default_factory=list)  # failures (the prune is partial)


@dataclass(frozen=True)
class _Pack:
    """A pack the target lists and this cache knows: what it weighs and how much is live."""

    name: str
    size: int  # stored bytes
    content: int  # its blobs' total length
    live: int  # the referenced blobs' total length

    @property
    def dead_share(self) -> float:
        return 1 - self.live / self.content if self.content else 0.0


@dataclass
class _Plan:
    delete: list[_Pack] = field(default_factory=list)
    repack: list[_Pack] = field(default_factory=list)
    waiting: int = 0


# -- the referenced set -------------------------------------------------------------------------

class Referenced:
    """The union of some backups' blob ids, in a temporary SQLite file in ``staging``
    (removed on close; its name marks it as this process's scratch, swept if killed)."""

    def __init__(self, staging: Path, streams: Sequence[Callable[[], Iterator[bytes]]]) -> None:
        """``streams``: each opens one sorted stream of raw ids (a backup's refs).

        Raises:
            OSError, sqlite3.Error: the scratch file cannot be written; a refs file is gone.
        """
        self.path = staging / scratch_name("gc-refs")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            self._db.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
            self._db.execute("CREATE TABLE ids (id BLOB PRIMARY KEY) WITHOUT ROWID")
            for start in range(0, len(streams), _MERGE_FILES):
                group = [opened() for opened in streams[start:start + _MERGE_FILES]]
                self._db.execute("BEGIN")
                # A sorted merge: the first group only appends to the B-tree, and later ones
                # insert in id order too (good locality).
                self._db.executemany("INSERT OR IGNORE INTO ids VALUES (?)",
                                     ((raw,) for raw in merged(group)))
                self._db.execute("COMMIT")
        except BaseException:
            self.close()
            raise

    def __contains__(self, blob: str) -> bool:
        return self._db.execute("SELECT 1 FROM ids WHERE id = ?",
                                (bytes.fromhex(blob),)).fetchone() is not None

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM ids").fetchone()[0])

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Referenced:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_blobs(index: IO[bytes]) -> Iterator[str]:
    for line in index:
        entry = IndexEntry.from_line(line)
        yield from entry.blobs or ()


def _fetch_refs(ctx: Context, index: BlobIndex, backup: Backup) -> None:
    """Write ``backup``'s refs from its uploads index, read from its first good copy.

    Raises:
        ConexaError: no copy's index can be read here (damaged, or encrypted and no identity).
    """
    staging = ctx.state_dir("staging")

    def attempt(copy: Copy, manifest: Manifest) -> None:
        with tempfile.TemporaryFile(dir=staging, prefix="gc-index-") as plain:
            # Parsed only once read_index checked every byte (against the manifest, or each
            # piece against its id); the pieces themselves are blobs the backup references.
            _, chunks = read_index(ctx, copy, backup.id, manifest,
                                   lambda src: copy_stream(src, plain))
            plain.seek(0)
            index.write_refs(backup.id, itertools.chain(chunks, _index_blobs(plain)))

    from_first_good(backup, attempt)


def referencing(ctx: Context, index: BlobIndex, target: str, backups: Sequence[Backup],
                gone: Collection[str]) -> list[str] | str:
    """The ids of the packs-format backups with a manifest on ``target`` (those in ``gone``,
    deleted by this prune, aside), each with its refs cached (fetched from its uploads index
    when missing); or why GC must not run on ``target`` (we cannot know what is referenced).
    """
    ids = []
    for backup in backups:
        if backup.id in gone:
            continue
        for copy in backup.copies:
            if copy.target.name != target:
                continue
            if copy.problem is not None:
                return f"backup {backup.id} has an unreadable manifest here ({copy.problem})"
            uploads = copy.manifest.uploads if copy.manifest is not None else None
            if uploads is None or uploads.format != "packs":
                continue  # a tar backup, or a run in progress or failed (the grace covers it)
            if not index.has_refs(backup.id):
                try:
                    _fetch_refs(ctx, index, backup)
                except ConexaError as exc:
                    return (f"the blob ids of backup {backup.id} are not cached on this host "
                            f"and its uploads index cannot be read ({exc})")
            ids.append(backup.id)
    return ids


# -- planning -----------------------------------------------------------------------------------

def _listed(target: Target) -> dict[str, datetime | None]:
    """Every pack on ``target`` and its modified time (None: unknown)."""
    found = {}
    for obj in target.list(packs.PACKS_PREFIX):
        name = packs.pack_name(obj.key)
        if name is not None:
            found[name] = obj.modified
    return found


def plan(index: BlobIndex, target: str, listed: dict[str, datetime | None],
         refs: Referenced, *, now: datetime, grace: timedelta, threshold: float) -> _Plan:
    """Which packs to delete and to repack. Only packs both listed and known to this cache
    are judged (one it could not read holds blobs nobody can name); one younger than
    ``grace``, or of unknown age, is kept: a backup in progress may reference it soon."""
    result = _Plan()
    for held in index.held(target):
        modified = listed.get(held.name, "absent")
        blobs = index.pack_blobs(held.name)
        if modified == "absent" or not blobs:
            continue
        pack = _Pack(held.name, held.size, sum(n for _, n in blobs),
                     sum(n for b, n in blobs if b in refs))
        old = isinstance(modified, datetime) and now - modified >= grace
        if pack.live == 0 and old:
            result.delete.append(pack)
        elif pack.live == 0:
            result.waiting += 1
        elif pack.dead_share > threshold and old:
            result.repack.append(pack)
    return result


# -- acting -------------------------------------------------------------------------------------

def upload_pack(target: Target, index: BlobIndex, pack: packs.StoredPack) -> None:
    """Store a new pack on ``target``, then record it in the cache (crash test step).

    Raises:
        StorageError: the upload failed (nothing is recorded).
    """
    upload = target.writer(pack.key)
    try:
        with pack.path.open("rb") as fh:
            while data := fh.read(CHUNK):
                upload.write(data)
        upload.commit()
    except BaseException:
        upload.abort()
        raise
    index.add_pack(pack.name, [(b.id, b.length) for b in pack.blobs], [(target.name, pack.size)])


def delete_pack(target: Target, index: BlobIndex, name: str) -> None:
    """Forget that ``target`` holds pack ``name``, then delete it there (crash test step).

    In this order, a kill (or a refused delete) between the two leaves the cache claiming
    less than the target holds (the next sync reads the pack's index again), never a pack
    the target no longer lists: a backup's sync takes such a pack as lost and would record
    every backup naming one of its blobs as damaged, though after a repack they are whole.

    Raises:
        StorageError: the target refused (the pack stays; the next sync finds it again).
    """
    index.drop_held(target.name, name)
    target.delete(packs.pack_key(name))


class _WriteFailed(ConexaError):
    """A new pack could not be stored: no pack is repacked in this run."""


class _Repacker:
    """Copies the referenced blobs of doomed packs that no surviving pack holds into new
    packs, written as a backup writes them (compression, recipients, dedup key)."""

    def __init__(self, ctx: Context, index: BlobIndex, target: Target, refs: Referenced,
                 listed: Collection[str], doomed: set[str], identities: list[Any],
                 key: bytes | None, report: GcReport) -> None:
        self._ctx, self._index, self._target, self._refs = ctx, index, target, refs
        self._listed = listed
        self._doomed, self._identities, self._key = doomed, identities, key
        self._report = report
        self._scratch = ctx.state_dir("staging")
        self._writers: dict[str, packs.PackWriter] = {}
        recipients = ctx.config.encryption.recipients
        self._recipients = parse_recipients(recipients) if recipients else []
        self.bad: set[str] = set()  # packs found damaged or unreadable: never a holder

    def _kept(self, blob: str) -> bool:
        """Whether a pack that stays on the target holds ``blob``: one it listed, or one
        written since, and neither doomed nor found bad by this run."""
        return any(p not in self._doomed and p not in self.bad
                   and (p in self._listed or p in self._report.written)
                   for p in self._index.packs_holding(self._target.name, blob))

    def _writer(self, ids: str) -> packs.PackWriter:
        # A blob keeps its id, so it goes to a pack of its own id kind (plain or keyed).
        writer = self._writers.get(ids)
        if writer is None:
            writer = self._writers[ids] = packs.PackWriter(
                self._scratch, self._stored, key=None if ids == "sha256" else self._key,
                recipients=self._recipients, compression=self._ctx.config.compression)
        return writer

    def _stored(self, pack: packs.StoredPack) -> None:
        try:
            upload_pack(self._target, self._index, pack)
        except StorageError as exc:
            # Not the read error of one old pack: blobs of packs copied before may be in
            # this one, so no repacked pack may go.
            raise _WriteFailed(str(exc)) from exc
        self._report.written.append(pack.name)
        self._report.written_bytes += pack.size
        log.info("gc %s: wrote pack %s (%d bytes)", self._target.name, pack.name, pack.size)

    def copy(self, name: str) -> None:
        """Copy what must outlive pack ``name`` into the open writers.

        Raises:
            IntegrityError, UnusableCopyError, StorageError: it cannot be read here.
        """
        with self._target.open(packs.pack_key(name)) as stored, \
                packs.open_pack(name, stored, self._scratch, key=self._key,
                                identities=self._identities) as reader:
            self._copy(name, reader, encrypted=reader.encrypted)

    def _copy(self, name: str, reader: packs.PackReader, *, encrypted: bool) -> None:
        if not self._recipients and (encrypted or reader.index.ids != "sha256"):
            # This host reads encrypted packs but has no recipients to write them: never
            # rewrite a school's uploads in plaintext (a restore host's config, say).
            raise UnusableCopyError(f"pack {name} is encrypted (or keyed) and this config "
                                    "has no [encryption] recipients to rewrite it")
        writer = self._writer(reader.index.ids)
        for ref in reader.index.blobs:
            if ref.id in self._refs and not self._kept(ref.id):
                writer.add(ref.id, reader.read(ref.id))


    def finish(self) -> None:
        """Close and upload every open new pack."""
        for writer in self._writers.values():
            writer.flush()

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()


def _identities(ctx: Context) -> list[Any] | None:
    try:
        return ctx.keys().identities()
    except ConexaError:
        return None


def _repack(ctx: Context, index: BlobIndex, target: Target, refs: Referenced,
            listed: Collection[str], work: _Plan, report: GcReport) -> list[_Pack]:
    """Write the new packs for ``work.repack``; return the packs that may now go (every
    referenced blob of theirs is in a pack that stays). Uploads come first, all of them."""
    identities = _identities(ctx)
    if ctx.config.encryption.recipients and identities is None:
        report.notes.append(f"{len(work.repack)} pack(s) mostly unreferenced but not repacked: "
                            "they are encrypted and this host holds no age identity")
        log.warning("gc %s: %s", target.name, report.notes[-1])
        return []
    doomed = {p.name for p in work.delete} | {p.name for p in work.repack}
    repacker = _Repacker(ctx, index, target, refs, listed, doomed, identities or [],
                         backup_packs.dedup_key(ctx), report)
    done = []
    try:
        for pack in work.repack:
            try:
                repacker.copy(pack.name)
            except (IntegrityError, UnusableCopyError, StorageError) as exc:
                doomed.discard(pack.name)  # kept whole: what it holds stays where it is
                if not isinstance(exc, UnusableCopyError):  # intact only if merely unusable
                    repacker.bad.add(pack.name)
                report.notes.append(f"pack {pack.name} not repacked: {exc}")
                log.warning("gc %s: %s", target.name, report.notes[-1])
                continue
            done.append(pack)
        repacker.finish()
    except _WriteFailed as exc:
        repacker.abort()
        report.errors.append(f"repacking stopped, no pack repacked: {exc}")
        log.error("gc %s: %s", target.name, report.errors[-1])
        return []
    except BaseException:
        repacker.abort()
        raise
    return done


def _delete(target: Target, index: BlobIndex, doomed: Sequence[_Pack],
            report: GcReport) -> list[_Pack]:
    gone = []
    for pack in doomed:
        try:
            delete_pack(target, index, pack.name)
        except StorageError as exc:
            report.errors.append(f"pack {pack.name}: {exc}")
            log.error("gc %s: cannot delete pack %s: %s", target.name, pack.name, exc)
            continue
        gone.append(pack)
    return gone


def collect(ctx: Context, index: BlobIndex, target: Target, backup_ids: Sequence[str], *,
            now: datetime, dry_run: bool) -> GcReport:
    """Collect the packs on ``target`` that ``backup_ids`` (every backup there that
    references packs, their refs cached) no longer need. ``index`` must have been synced
    with ``target`` in this run; packs it could not read are never touched.

    Raises:
        StorageError: the target cannot be listed or read (what was done stays done).
    """
    config = ctx.config.uploads
    grace = parse_duration(config.gc_grace if config else DEFAULT_GRACE)
    threshold = config.repack_threshold if config else DEFAULT_THRESHOLD
    report = GcReport()
    listed = _listed(target)
    streams = [functools.partial(index.read_refs, i) for i in backup_ids]
    with Referenced(ctx.state_dir("staging"), streams) as refs:
        work = plan(index, target.name, listed, refs, now=now, grace=grace, threshold=threshold)
        report.waiting = work.waiting
        if dry_run:
            _preview(ctx, work, report)
            return report
        repacked = _repack(ctx, index, target, refs, listed.keys(), work, report) \
            if work.repack else []
        deleted = {p.name for p in _delete(target, index, [*work.delete, *repacked], report)}
    for pack in work.delete:
        if pack.name in deleted:
            report.deleted.append(pack.name)
            report.deleted_bytes += pack.size
            log.info("gc %s: deleted pack %s (%d bytes, unreferenced)", target.name,
                     pack.name, pack.size)
    for pack in repacked:
        if pack.name in deleted:
            report.repacked.append(pack.name)
            report.repacked_bytes += pack.size
            log.info("gc %s: repacked pack %s (%d bytes, %.0f%% unreferenced)", target.name,
                     pack.name, pack.size, 100 * pack.dead_share)
    report.freed = report.deleted_bytes + report.repacked_bytes - report.written_bytes
    return report


def _preview(ctx: Context, work: _Plan, report: GcReport) -> None:
    report.deleted = [p.name for p in work.delete]
    report.deleted_bytes = sum(p.size for p in work.delete)
    report.freed = report.deleted_bytes
    if work.repack and ctx.config.encryption.recipients and _identities(ctx) is None:
        report.notes.append(f"{len(work.repack)} pack(s) mostly unreferenced would not be "
                            "repacked: they are encrypted and this host holds no age identity")
        return
    report.repacked = [p.name for p in work.repack]
    report.repacked_bytes = sum(p.size for p in work.repack)
    # What repacking frees: each pack's unreferenced share of its stored bytes, about.
    report.freed += sum(round(p.size * p.dead_share) for p in work.repack)


def gc_target(ctx: Context, target: Target, backups: Sequence[Backup], gone: Collection[str],
              *, now: datetime, dry_run: bool) -> GcReport:
    """Garbage-collect packs on ``target`` once the backups in ``gone`` were deleted there:
    sync the cache with the target's listing, make sure every remaining backup's refs are
    cached, then :func:`collect`. Failures are in the report, never raised."""
    try:
        with BlobIndex.open(ctx.config.state_dir) as index:
            index.sync(target, backup_packs.index_reader(ctx, target))
            # A loss this sync sees is said now: the next backup's sync would not see it.
            backup_packs.record_lost(ctx, [b for b in backups if b.id not in gone], index,
                                     target.name)
            found = referencing(ctx, index, target.name, backups, gone)
            if isinstance(found, str):
                log.warning("gc %s: no pack collected: %s", target.name, found)
                return GcReport(skipped=found)
            return collect(ctx, index, target, found, now=now, dry_run=dry_run)
    except (ConexaError, OSError, sqlite3.Error) as exc:  # a target down, staging's disk full
        log.error("gc %s: %s", target.name, exc)
        return GcReport(errors=[f"garbage collection: {exc}"])
