"""The uploads stage of a packs-format backup (issue 15; docs/packs.md).

The tree is walked as for a tar (``archive.walk``: same rules, same skips). A file the file
cache knows unchanged is not read, unless a target lacks one of its blobs or the rehash share
picks it. Each blob read goes to the pack writer of exactly the set of targets that lack it
(usually one writer: every target lacks the same new blobs), so no pack is produced twice
and a target that skipped backups (an archive tier) or was added later gets everything it
lacks. Each pack is uploaded to the targets of its set as soon as it closes; a target that
fails drops out of the run, as for any artifact.

Then the uploads index (every entry: path, type, mode, owner, mtime; files' size, SHA-256 and
blob ids) is stored as the ``uploads-index`` artifact, checksummed in the manifest. The
manifest stays the one commit point: it is written only to targets that received every pack
they lacked, so a target holding the manifest holds every blob the index names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from conexa_backup import archive, packs, signals
from conexa_backup.blobindex import BlobIndex, RefsWriter
from conexa_backup.catalog import Backup
from conexa_backup.crypto import load_dedup_key
from conexa_backup.errors import ConexaError, IntegrityError, StorageError, UnusableCopyError
from conexa_backup.filecache import Entry, FileCache, key_fingerprint
from conexa_backup.manifest import Attrs, IndexEntry, file_line, shown_path
from conexa_backup.pipeline import CHUNK, copy_stream
from conexa_backup.scratch import scratch_name
from conexa_backup.state import record_damaged
from conexa_backup.storage.base import Target
from conexa_backup.storage.fanout import AllTargetsFailed, MultiUpload

if TYPE_CHECKING:
    from conexa_backup.actions.backup import _Run
    from conexa_backup.actions.context import Context

log = logging.getLogger(__name__)


def dedup_key(ctx: Context) -> bytes | None:
    """The configured dedup key (HMAC blob ids), or None (plain SHA-256 ids).

    Raises:
        ConfigError: the key file is unreadable or malformed.
    """
    path = ctx.config.encryption.dedup_key_file
    return load_dedup_key(path) if path is not None else None


def index_reader(ctx: Context, target: Target) -> Any:
    """A ``read_index(name)`` for :meth:`BlobIndex.sync`: downloads pack ``name`` from
    ``target`` and reads its own index; None (with a warning) when it cannot be read here
    (damaged, unreadable, or encrypted and this host holds no identity)."""
    scratch = ctx.state_dir("staging")

    def identities() -> list[Any] | None:
        try:
            return ctx.keys().identities()
        except ConexaError:
            return None  # a backup host holds recipients only: encrypted packs stay unread

    def read(name: str) -> list[tuple[str, int]] | None:
        try:
            with target.open(packs.pack_key(name)) as stored:
                index = packs.read_index(name, stored, scratch, identities())
        except (IntegrityError, UnusableCopyError, StorageError) as exc:
            log.warning("target %s: pack %s cannot be read here (%s); its blobs count as "
                        "absent", target.name, name, exc)
            return None
        except OSError as exc:  # this host's scratch space, not the pack
            raise ConexaError(f"cannot read pack {name} into {scratch}: "
                              f"{exc.strerror or exc}") from None
        return [(b.id, b.length) for b in index.blobs]

    return read


@dataclass
class _Counts:
    files_read: int = 0
    bytes_read: int = 0
    stale: int = 0  # cached files whose re-read found other bytes
    blobs_new: int = 0
    bytes_new: int = 0
    packs: int = 0
    bytes_stored: int = 0


class _Packer:
    """Routes each blob to the pack writer of the targets that lack it, and uploads packs."""

    def __init__(self, ctx: Context, run: _Run, index: BlobIndex, key: bytes | None,
                 counts: _Counts) -> None:
        self._ctx, self._run, self._index, self._key = ctx, run, index, key
        self._counts = counts
        self._scratch = ctx.state_dir("staging")
        self.writers: dict[frozenset[str], packs.PackWriter] = {}
        self._pending: _PackUpload | None = None

    def present(self, blobs: set[str]) -> set[str]:
        """Those of ``blobs`` every target live at the start held then."""
        return self._index.present(blobs)

    def lacking(self, blob: str) -> frozenset[str]:
        """The live targets that hold no pack with ``blob``."""
        if self._index.everywhere(blob):  # held by every target live at the start
            return frozenset()
        live = {t.name for t in self._run.alive}
        return frozenset(live - self._index.holders(blob))

    def add(self, blob: str, data: bytes) -> None:
        lack = self.lacking(blob)
        if not lack:
            return
        writer = self.writers.get(lack)
        if writer is None:
            writer = self.writers[lack] = packs.PackWriter(
                self._scratch, lambda pack: self._store(lack, pack), key=self._key,
                recipients=self._run.recipients, compression=self._ctx.config.compression)
        try:
            added = writer.add(blob, data)
        except OSError as exc:
            raise ConexaError(f"cannot write a pack in {self._scratch}: "
                              f"{exc.strerror or exc}") from None
        if added:
            self._counts.blobs_new += 1
            self._counts.bytes_new += len(data)

    def _store(self, lack: frozenset[str], pack: packs.StoredPack) -> None:
        """Hand a closed pack to the uploader (a thread: the walk goes on meanwhile) for the
        live targets of ``lack``, after the previous upload ended; record who holds it at
        once, so later blobs of this run never go into a second pack."""
        self._settle()
        targets = [t for t in self._run.alive if t.name in lack]
        if not targets:
            return  # every target that lacked these blobs has failed meanwhile
        # Take the scratch file over: the writer removes its own name when this returns.
        owned = pack.path.with_name(scratch_name(f"upload-{pack.name[:12]}"))
        pack.path.rename(owned)
        self._index.add_pack(pack.name, [(b.id, b.length) for b in pack.blobs],
                             [(t.name, pack.size) for t in targets])
        with signals.held():  # started and known to abort(), or neither
            self._pending = _PackUpload(self._ctx, pack, targets, owned)
            self._pending.start()

    def _settle(self) -> None:
        """Wait for the upload in flight; a target it failed on drops out of the run (its
        error recorded, and the cache no longer says it holds the pack).

        Raises:
            ConexaError: every target has failed. What the upload raised otherwise.
        """
        upload = self._pending
        if upload is None:
            return
        upload.join()  # an interrupt here leaves it pending: abort() stops it
        self._pending = None
        if upload.error is not None:
            for target in upload.targets:  # recorded as held at hand-over: it is not there
                self._index.drop_held(target.name, upload.pack.name)
            if isinstance(upload.error, OSError):
                raise ConexaError(f"uploading pack {upload.pack.name}: "
                                  f"{upload.error.strerror or upload.error}") from None
            raise upload.error
        self._run.failures.update(upload.failures)
        failed = {t.name for t in upload.targets} - upload.stored
        for name in failed:
            self._index.drop_held(name, upload.pack.name)
        self._run.alive = [t for t in self._run.alive if t.name not in failed]
        if not self._run.alive:
            raise ConexaError("every target failed: " + "; ".join(self._run.failures.values()))
        self._counts.packs += 1
        self._counts.bytes_stored += upload.pack.size

    def finish(self) -> None:
        """Close and upload every open pack; wait for the last upload."""
        for writer in self.writers.values():
            writer.flush()
        self._settle()

    def abort(self) -> None:
        """Discard open packs; stop the upload in flight and wait for it (never raises)."""
        for writer in self.writers.values():
            writer.abort()
        upload, self._pending = self._pending, None
        if upload is not None and upload.is_alive():
            upload.stop.set()
            upload.join()


class _PackUpload(threading.Thread):
    """One closed pack, uploaded to ``targets`` at once (:class:`MultiUpload`) from its
    scratch file, which it removes. A target that fails is recorded in ``failures``;
    ``stored`` names those that committed; ``error`` holds anything else it raised."""

    def __init__(self, ctx: Context, pack: packs.StoredPack, targets: list[Target],
                 path: Path) -> None:
        super().__init__(name=f"upload-pack-{pack.name[:8]}", daemon=True)
        self.ctx, self.pack, self.targets, self.path = ctx, pack, targets, path
        self.stop = threading.Event()
        self.stored: set[str] = set()
        self.failures: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        multi: MultiUpload | None = None
        try:
            multi = MultiUpload(self.targets, self.pack.key)
            with self.path.open("rb") as fh:
                while (data := fh.read(CHUNK)) and not self.stop.is_set():
                    multi.write(data)
                    self.ctx.reporter.advance(len(data))
            if self.stop.is_set():
                multi.abort()
                return
            self.stored = set(multi.commit())
        except AllTargetsFailed as exc:  # the run goes on with the other targets, if any
            self.failures.update(exc.failures)
        except BaseException as exc:  # raised in the walking thread by _settle
            if multi is not None:
                multi.abort()
            self.error = exc
        finally:
            if multi is not None:
                self.failures.update(multi.failures)
            self.path.unlink(missing_ok=True)


def _attrs(st: os.stat_result) -> Attrs:
    return Attrs(mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                 mtime_ns=st.st_mtime_ns)


@dataclass
class _Folder:
    """A folder the walk is in: its files' cache entries not yet met (by name), and which of
    their blobs every target held at the start (each one query, for the whole folder)."""

    rel: str
    cached: dict[str, Entry]
    present: set[str]
    # A folder of more than FOLDER_IN_MEMORY cached files: looked up file by file instead
    # (memory stays flat whatever one folder holds).
    per_file: bool = False


FOLDER_IN_MEMORY = 20_000
PRESENT_BATCH = 16  # a folder's blobs asked about in one query, above this many


def _within(rel: str, folder: str) -> bool:
    return folder == "." or rel == folder or rel.startswith(folder + "/")


class _Stage:
    """One walk of the tree: entries to the index, blobs to the packer.

    The file cache is read a folder at a time (:meth:`FileCache.children`) and each file's
    lstat compared in memory: an unchanged file costs its stat and a line of index, no query
    of its own (a per-file lookup took most of an unchanged backup's time: measured).
    """

    def __init__(self, packer: _Packer, cache: FileCache, key: bytes | None, out: IO[bytes],
                 counts: _Counts, refs: RefsWriter) -> None:
        self.packer, self.cache, self.key, self.out = packer, cache, key, out
        self.refs = refs
        self.counts = counts
        self.stats = archive.TreeStats()
        self.folders: list[_Folder] = []  # the walk's current path, as far as files go

    def write(self, entry: IndexEntry) -> None:
        self.out.write(entry.to_line())

    def run(self, root: Path) -> None:
        if not root.is_dir():
            raise ConexaError(f"uploads folder {root} does not exist or is not a folder")
        self.write(IndexEntry(".", "dir", **_attrs(root.stat())))
        with contextlib.closing(archive.walk(root, self.stats.skipped)) as entries:
            for entry in entries:
                if entry.kind == stat.S_IFREG:
                    self.file(entry)
                else:
                    self.other(entry)
        while self.folders:
            self._leave(self.folders.pop())

    def _folder(self, entry: archive.Entry) -> _Folder:
        """The folder holding ``entry``, its cache entries read on the first file met there;
        folders the walk has left are handed to the cache (:meth:`FileCache.keep`)."""
        parent = entry.rel.rpartition("/")[0] or "."
        while self.folders and not _within(parent, self.folders[-1].rel):
            self._leave(self.folders.pop())
        if not self.folders or self.folders[-1].rel != parent:
            if self.cache.count_children(parent) > FOLDER_IN_MEMORY:
                self.folders.append(_Folder(parent, {}, set(), per_file=True))
                return self.folders[-1]
            cached = self.cache.children(parent)
            ids = {b for e in cached.values() for b in e.blobs}
            # A few ids: one point query each (lacking) costs less than one batch query.
            present = self.packer.present(ids) if len(ids) > PRESENT_BATCH else set()
            self.folders.append(_Folder(parent, cached, present))
        return self.folders[-1]

    def _leave(self, folder: _Folder) -> None:
        # What was cached and not met (deleted, or skipped this time) is dropped; a large
        # folder's files were marked one by one (what was not met goes at finish()).
        if not folder.per_file:
            self.cache.keep(folder.rel, list(folder.cached))

    def other(self, entry: archive.Entry) -> None:
        """A folder or a symlink: its lstat (and link text), taken relative to its folder."""
        try:
            st = os.stat(entry.name, dir_fd=entry.dir_fd, follow_symlinks=False)
            kind = stat.S_IFMT(st.st_mode)
            text = os.readlink(entry.name, dir_fd=entry.dir_fd) if kind == stat.S_IFLNK else None
        except FileNotFoundError:
            return
        except OSError as exc:
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return
        if kind == stat.S_IFDIR:
            self.write(IndexEntry(entry.rel, "dir", **_attrs(st)))
            self.stats.dirs += 1
        elif kind == stat.S_IFLNK:
            attrs = _attrs(st)
            del attrs["mode"]  # a link's mode means nothing on Linux
            self.write(IndexEntry(entry.rel, "symlink", target=text, **attrs))
            self.stats.symlinks += 1
        else:
            self.stats.skipped.add(entry.rel, "replaced while being read")

    def file(self, entry: archive.Entry) -> None:
        assert entry.st is not None
        folder = self._folder(entry)
        if folder.per_file:
            cached = self.cache.lookup(entry.rel, entry.st)  # marks it seen
        else:
            cached = folder.cached.pop(entry.name, None)
        if cached is not None and not cached.matches(entry.st):
            cached = None
        if cached is not None and not self.cache.should_rehash(entry.rel) \
                and all(b in folder.present or not self.packer.lacking(b)
                        for b in cached.blobs):
            # Unchanged, by the walk's own lstat: not even opened.
            self.indexed(entry.rel, entry.st, cached.size, cached.sha256, cached.blobs)
            return
        try:
            fd, st = archive.open_file(entry.name, entry.dir_fd)
        except FileNotFoundError:
            return
        except archive.Replaced as exc:
            self.stats.skipped.add(entry.rel, f"replaced while being read: now {exc}")
            return
        except OSError as exc:
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return
        try:
            size, sha256, blobs = self._read(entry.rel, fd, st, cached)
        except _SourceError as exc:  # e.g. EIO halfway: this file only; its pieces are harmless
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return
        finally:
            os.close(fd)
        self.indexed(entry.rel, st, size, sha256, blobs)

    def indexed(self, rel: str, st: os.stat_result, size: int, sha256: str,
                blobs: Sequence[str]) -> None:
        self.out.write(file_line(rel, size, sha256, stat.S_IMODE(st.st_mode), st.st_uid,
                                 st.st_gid, st.st_mtime_ns, blobs))
        self.refs.add(blobs)
        self.stats.files += 1
        self.stats.bytes += size

    def _read(self, rel: str, fd: int, st: os.stat_result,
              cached: Entry | None) -> tuple[int, str, tuple[str, ...]]:
        """(size, SHA-256, blob ids) of the open file, read: its blobs go to the packer.

        A file changed within a clock tick of the read's start (:func:`_racy`) is not
        recorded in the file cache (git's "racily clean" rule): it could change again within
        the same tick, unseen by the next run's stat.

        Raises:
            _SourceError: reading the file failed (only this file is lost). What the packer
            raises otherwise (a pack that cannot be written or uploaded fails the run).
        """
        started = time.time_ns()
        with io.FileIO(fd, "rb", closefd=False) as raw:
            found = packs.file_blobs(_Source(raw), self.key,  # type: ignore[arg-type]
                                     on_piece=self.packer.add)
        self.counts.files_read += 1
        self.counts.bytes_read += found.size
        if cached is not None and cached.size == found.size and cached.sha256 != found.sha256:
            self.counts.stale += 1
            log.warning("uploads: %s changed without its size, mtime or ctime changing "
                        "(found by a re-read)", shown_path(rel))
        if not _racy(st, started):
            self.cache.record(rel, st, found.blobs, found.sha256)
        return found.size, found.sha256, tuple(found.blobs)


def _racy(st: os.stat_result, started_ns: int) -> bool:
    """Whether a change to the file in the same timestamp tick as ``st`` could go unseen:
    its newest time is within a tick of ``started_ns``. A tick: 2 s where times look like
    whole seconds (file systems that keep no more), else 20 ms (kernels before 6.13 stamp
    files with the scheduler tick, 4 to 10 ms)."""
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    tick = 2 * 10**9 if newest % 10**9 == 0 else 20 * 10**6
    return started_ns - newest < tick


class _SourceError(Exception):
    """Reading an uploads file failed (as opposed to writing a pack)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.strerror = exc.strerror or str(exc)


class _Source:
    """An uploads file being read: its OSErrors become :class:`_SourceError`, so that an
    error of the packer (a full staging disk, a failed upload) is never taken for one file
    that could not be read."""

    def __init__(self, raw: io.FileIO) -> None:
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        try:
            return self._raw.read(n) or b""
        except OSError as exc:
            raise _SourceError(exc) from None


def record_lost(ctx: Context, backups: Sequence[Backup], index: BlobIndex,
                target: str) -> None:
    """After :meth:`BlobIndex.sync`: packs it found gone from ``target`` (or damaged) held
    blobs that no pack there still holds (:meth:`BlobIndex.lost_blobs`, streamed): every
    complete backup there that names one is recorded damaged on it (status, list and prune
    say so until a verify proves it good again; the next backup stores those blobs again,
    which lets such a verify pass). Prune calls it too, so a loss it syncs is not hidden."""
    if next(index.lost_blobs(target), None) is None:
        return
    for backup in backups:
        if any(c.target.name == target and c.complete for c in backup.copies) \
                and index.refs_touch(backup.id, index.lost_blobs(target)):
            why = (f"target {target!r}: {backup.id}: a pack holding some of its uploads is "
                   "missing (seen when the next backup listed the packs)")
            log.warning("%s", why)
            record_damaged(ctx.config.state_dir, backup.id, target, why)


def store_uploads(ctx: Context, run: _Run, root: Path, *,
                  rehash: bool = False) -> tuple[archive.TreeStats, dict[str, Any]]:
    """:func:`_store_uploads`, with the caches' SQLite errors (a full ``state_dir``, a
    locked file) said in one line naming ``state_dir``."""
    try:
        return _store_uploads(ctx, run, root, rehash=rehash)
    except sqlite3.Error as exc:
        raise ConexaError(f"state_dir {ctx.config.state_dir}: the file cache or pack index "
                          f"failed: {exc}") from None


def _store_uploads(ctx: Context, run: _Run, root: Path, *,
                   rehash: bool = False) -> tuple[archive.TreeStats, dict[str, Any]]:
    """Store the uploads under ``root`` as packs plus the uploads index; return what the
    tree held and the :class:`UploadsInfo` fields that say how it is stored. Entries that
    cannot be read are skipped and recorded (the caller turns them into warnings), as for
    a tar. With ``rehash`` every file is read (``backup --rehash``).

    Raises:
        ConexaError: ``root`` is missing or unreadable, the dedup key is bad, or every target
        failed. StorageError: a target cannot be listed.
    """
    key = dedup_key(ctx)
    counts = _Counts()
    assert ctx.config.uploads is not None
    share = ctx.config.uploads.rehash_share
    with BlobIndex.open(ctx.config.state_dir) as index, \
            tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+b",
                                          dir=str(ctx.state_dir("staging"))) as spool:
        for target in list(run.alive):
            try:
                index.sync(target, index_reader(ctx, target))
                record_lost(ctx, run.existing, index, target.name)
            except StorageError as exc:
                run.failures[target.name] = str(exc)
                run.alive = [t for t in run.alive if t.name != target.name]
                log.error("%s", exc)
        if not run.alive:
            raise ConexaError("every target failed: " + "; ".join(run.failures.values()))
        index.note_everywhere([t.name for t in run.alive])
        packer = _Packer(ctx, run, index, key, counts)
        with FileCache.open(ctx.config.state_dir, root, key_fingerprint(key),
                            rehash_share=share, rehash_all=rehash) as cache, \
                index.refs_writer(run.backup_id) as refs:
            stage = _Stage(packer, cache, key, spool, counts, refs)
            try:
                stage.run(root)
                packer.finish()
            except BaseException:
                packer.abort()
                raise
            cache.finish()
        spool.seek(0)
        run.store("uploads-index", "uploads.index.jsonl", "jsonl",
                  lambda out: copy_stream(spool, out))
    log.info("uploads: %d files (%d read, %d bytes), %d new blobs (%d bytes) in %d packs "
             "(%d bytes stored)", stage.stats.files, counts.files_read, counts.bytes_read,
             counts.blobs_new, counts.bytes_new, counts.packs, counts.bytes_stored)
    return stage.stats, {"format": "packs", "ids": "sha256" if key is None else "hmac-sha256",
                         "key_id": None if key is None else packs.key_id(key)}
