"""The uploads stage of a packs-format backup (issue 15; docs/packs.md).

The tree is walked as for a tar (``archive.walk``: same rules, same skips). A file the file
cache knows unchanged is not read, unless a target lacks one of its blobs or the rehash share
picks it. Each blob read goes to the pack writer of exactly the set of targets that lack it
(usually one writer: every target lacks the same new blobs), so no pack is produced twice
and a target that skipped backups (an archive tier) or was added later gets everything it
lacks. Each pack is uploaded to the targets of its set as soon as it closes; a target that
fails drops out of the run, as for any artifact.

Then the uploads index (every entry: path, type, mode, owner, mtime; files' size, SHA-256 and
blob ids) is cut into pieces stored as blobs too (:mod:`uploads_index`: a piece unchanged
since an earlier backup is held already), and the list of pieces is the ``uploads-index``
artifact, checksummed in the manifest. The manifest stays the one commit point: it is
written only to targets that received every pack they lacked, so a target holding the
manifest holds every blob the index, and the list, name.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conexa_backup import archive, filecache, packs, signals
from conexa_backup.actions.uploads_index import Chunk, Cutter
from conexa_backup.blobindex import BlobIndex, Losses, RefsWriter
from conexa_backup.catalog import Backup
from conexa_backup.crypto import load_dedup_key
from conexa_backup.errors import ConexaError, IntegrityError, StorageError, UnusableCopyError
from conexa_backup.filecache import FileCache, FolderFiles, key_fingerprint
from conexa_backup.folderblocks import Folder, stat_text
from conexa_backup.manifest import Attrs, IndexEntry, dir_line, file_line, shown_path
from conexa_backup.pipeline import CHUNK
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


ASK_BEFORE_NOTING = 256  # blobs asked about one by one before the index notes them all


class _Packer:
    """Routes each blob to the pack writer of the targets that lack it, and uploads packs."""

    def __init__(self, ctx: Context, run: _Run, index: BlobIndex, key: bytes | None,
                 counts: _Counts) -> None:
        self._ctx, self._run, self._index, self._key = ctx, run, index, key
        self._counts = counts
        self._scratch = ctx.state_dir("staging")
        self.writers: dict[frozenset[str], packs.PackWriter] = {}
        self._pending: _PackUpload | None = None
        self._asked = 0
        self._noted = False

    def present(self, blobs: set[str]) -> set[str]:
        """Those of ``blobs`` every live target holds, in one query."""
        self._note_everywhere()
        return self._index.present(blobs)

    def lacking(self, blob: str) -> frozenset[str]:
        """The live targets that hold no pack with ``blob``."""
        self._asked += 1
        if self._asked > ASK_BEFORE_NOTING:
            self._note_everywhere()
        if self._noted and self._index.everywhere(blob):
            return frozenset()
        live = {t.name for t in self._run.alive}
        return frozenset(live - self._index.holders(blob))

    def _note_everywhere(self) -> None:
        """Have the index note which blobs every live target holds (a table of every blob:
        built only when a run asks about many; an unchanged tree asks about none)."""
        if not self._noted:
            self._index.note_everywhere([t.name for t in self._run.alive])
            self._noted = True

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
        """Close and upload every open pack; wait for the last upload.

        Raises:
            ConexaError: a pack could not be written (a full staging disk), or as
            :meth:`_settle`.
        """
        for writer in self.writers.values():
            try:
                writer.flush()
            except OSError as exc:
                raise ConexaError(f"cannot write a pack in {self._scratch}: "
                                  f"{exc.strerror or exc}") from None
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
class _Open:
    """A folder on the walk's current path: its cache state, whether its proof stands
    (every blob it names held by every live target, :meth:`Losses.holds`), and, asked once
    when it does not, which of its blobs every target held at the start."""

    folder: Folder
    proven: bool
    present: set[str] | None = None
    fd: int = -1  # the walk's fd of the folder, once an entry in it was met
    files: FolderFiles | None = None  # its file-by-file entries, once it has some


FOLDER_IN_MEMORY = 10_000  # files of one folder cached as a block; more: file by file
# (measured, 100,000 small files with two folders of 20,000: a first backup peaked at 150 MB
# of RSS with 20,000 here, 116 MB with 10,000)
LINES = 4096  # index lines gathered before they go to the cutter
PRESENT_BATCH = 16  # a folder's blobs asked about in one query, above this many


class _Stage:
    """One walk of the tree: entries to the index, blobs to the packer.

    The file cache is read a folder at a time, as the walk enters it (folder blocks, read
    ahead in the walk's order: :mod:`folderblocks`), and each file's lstat compared in
    memory. An unchanged file costs its stat, a compare and its stored index line; its
    blobs are not asked about when its folder's proof stands (a query per file, or per
    folder, took most of an unchanged backup's time: measured).
    """

    def __init__(self, packer: _Packer, cache: FileCache, key: bytes | None, out: Cutter,
                 counts: _Counts, refs: RefsWriter, losses: Losses, live: list[str],
                 floor: int) -> None:
        self.packer, self.cache, self.key, self.out = packer, cache, key, out
        self.refs = refs
        self.counts = counts
        # The run whose proof stands for every live target (blocks it or an earlier run
        # wrote are proven), or None.
        proof = cache.proof
        self.proven_run = proof[0] \
            if proof is not None and losses.holds(proof[1], live, floor=floor) else None
        self.stats = archive.TreeStats()
        self.path: list[_Open] = []  # the folders the walk is in, the root first
        self.lines: list[bytes] = []  # index lines not yet written to ``out`` (LINES at most)

    def write(self, entry: IndexEntry) -> None:
        self.lines.append(entry.to_line())

    def _flush_lines(self) -> None:
        self.out.feed(self.lines)
        self.lines.clear()

    def run(self, root: Path) -> None:
        if not root.is_dir():
            raise ConexaError(f"uploads folder {root} does not exist or is not a folder")
        self.write(IndexEntry(".", "dir", **_attrs(root.stat())))
        self._enter(".")
        lines = self.lines
        with contextlib.closing(archive.walk(root, self.stats.skipped)) as entries:
            for entry in entries:
                if entry.kind == stat.S_IFREG:
                    self.file(entry)
                else:
                    self.other(entry)
                if len(lines) >= LINES:
                    self._flush_lines()
        self._flush_lines()
        while self.path:
            self.cache.leave(self.path.pop().folder)

    def _enter(self, rel: str) -> None:
        """The walk yielded folder ``rel``: its contents come next."""
        if rel != ".":
            self._in(rel.rpartition("/")[0] or ".")
        folder = self.cache.folder(rel)
        self.path.append(_Open(folder, self._proven(folder)))

    def _in(self, rel: str) -> _Open:
        """Folder ``rel``, on the walk's path; the folders the walk has left are handed
        back to the cache (:meth:`FileCache.leave`)."""
        while self.path and self.path[-1].folder.rel != rel:
            self.cache.leave(self.path.pop().folder)
        if not self.path:  # never: the walk yields each folder before its contents
            self.path.append(_Open(self.cache.folder(rel), False))
        return self.path[-1]

    def _proven(self, folder: Folder) -> bool:
        return folder.written is not None and self._covered(folder.written)

    def _covered(self, written: int) -> bool:
        """Whether the proof covers what run ``written`` wrote to the cache."""
        return self.proven_run is not None and written <= self.proven_run

    def other(self, entry: archive.Entry) -> None:
        """A folder or a symlink, as the walk's lstat (taken relative to its folder) says."""
        st = entry.st
        assert st is not None
        if entry.kind == stat.S_IFDIR:
            self.lines.append(dir_line(entry.rel, stat.S_IMODE(st.st_mode), st.st_uid,
                                       st.st_gid, st.st_mtime_ns))
            self.stats.dirs += 1
            self._enter(entry.rel)
            return
        try:
            text = os.readlink(entry.name, dir_fd=entry.dir_fd)
        except FileNotFoundError:
            return
        except OSError as exc:  # EINVAL: no longer a link
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return
        attrs = _attrs(st)
        del attrs["mode"]  # a link's mode means nothing on Linux
        self.write(IndexEntry(entry.rel, "symlink", target=text, **attrs))
        self.stats.symlinks += 1

    def file(self, entry: archive.Entry) -> None:
        st = entry.st
        assert st is not None
        here = self.path[-1]
        if here.fd != entry.dir_fd:  # not the folder of the last file (the usual case)
            here = self._in(entry.rel.rpartition("/")[0] or ".")
            # The walk holds each folder of its path open: no other folder on our path has
            # this fd, and a folder opened later with it is entered (pushed) before its files.
            here.fd = entry.dir_fd
        folder = here.folder
        if folder.per_file:
            self._file_by_file(here, entry, st)
            return
        at = folder.take(entry.name, stat_text(st))
        if at is not None and not self.cache.chosen(folder.place(at)) \
                and (here.proven or self._held(here, folder.blobs(at))):
            # Unchanged, by the walk's own lstat: not even opened.
            self.lines.append(folder.line(at))
            self.refs.add_joined(folder.joined_blobs(at))
            self.stats.files += 1
            self.stats.bytes += st.st_size
            folder.keep(at)
            self._bounded(folder)
            return
        # A re-read of a file its folder's proof covers: its cached blobs are held already.
        held = frozenset(folder.blobs(at)) if at is not None and here.proven else frozenset()
        read = self._open_and_read(entry, folder.sha256(at) if at is not None else None, held)
        if read is None:
            return
        st, size, sha256, ids, cacheable = read
        line = self.indexed(entry.rel, st, size, sha256, ids)
        if cacheable:
            folder.add(entry.name, stat_text(st), self.cache.place(entry.rel), sha256,
                       list(ids), line, was=at)
            self._bounded(folder)

    def _bounded(self, folder: Folder) -> None:
        """A folder holding more than FOLDER_IN_MEMORY files (kept or read, in any order) is
        cached file by file from now on: memory stays flat whatever one folder holds."""
        if folder.count > FOLDER_IN_MEMORY:
            self.cache.spill(folder)

    def _held(self, here: _Open, blobs: Sequence[str]) -> bool:
        """Whether every live target holds ``blobs`` (asked when the folder's proof does
        not stand: its blobs in one query, when there are many)."""
        if here.present is None:
            ids = here.folder.left_blobs() | set(blobs)
            # A few ids: one point query each (lacking) costs less than one batch query.
            here.present = self.packer.present(ids) if len(ids) > PRESENT_BATCH else set()
        present = here.present
        return all(b in present or not self.packer.lacking(b) for b in blobs)

    def _file_by_file(self, here: _Open, entry: archive.Entry, st: os.stat_result) -> None:
        """A file of a folder cached file by file: looked up in the folder's entries, read
        in order a few hundred at a time (:class:`FolderFiles`), with the proof or the pack
        index for its blobs, as in a block."""
        if here.files is None:
            here.files = self.cache.files_of(here.folder.rel)
        cached = here.files.lookup(entry.rel, st)
        covered = cached is not None and self._covered(cached.written)
        if cached is not None and not self.cache.should_rehash(entry.rel) \
                and (covered or all(not self.packer.lacking(b) for b in cached.blobs)):
            self.indexed(entry.rel, st, cached.size, cached.sha256, cached.blobs)
            return
        held = frozenset(cached.blobs) if cached is not None and covered else frozenset()
        if cached is not None:  # seen, but not vouched for: its new record, or none
            self.cache.forget(entry.rel)
        read = self._open_and_read(entry, cached.sha256 if cached is not None else None, held)
        if read is None:
            return
        st, size, sha256, blobs, cacheable = read
        self.indexed(entry.rel, st, size, sha256, blobs)
        if cacheable:
            self.cache.record(entry.rel, st, list(blobs), sha256)

    def _open_and_read(self, entry: archive.Entry, cached_sha256: str | None,
                       held: frozenset[str] = frozenset()
                       ) -> tuple[os.stat_result, int, str, tuple[str, ...], bool] | None:
        """Open and read the file: (its fstat, size read, SHA-256, blob ids, whether the
        cache may keep it), or None when it vanished or could not be read (then recorded as
        skipped). Its blobs not in ``held`` go to the packer."""
        try:
            fd, st = archive.open_file(entry.name, entry.dir_fd)
        except FileNotFoundError:
            return None
        except archive.Replaced as exc:
            self.stats.skipped.add(entry.rel, f"replaced while being read: now {exc}")
            return None
        except OSError as exc:
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return None
        try:
            size, sha256, blobs, cacheable = self._read(entry.rel, fd, st, cached_sha256, held)
        except _SourceError as exc:  # e.g. EIO halfway: this file only; its pieces are harmless
            self.stats.skipped.add(entry.rel, f"cannot read: {exc.strerror}")
            return None
        finally:
            os.close(fd)
        return st, size, sha256, blobs, cacheable

    def indexed(self, rel: str, st: os.stat_result, size: int, sha256: str,
                blobs: Sequence[str]) -> bytes:
        """Write the file's index line (returned) and count it."""
        line = file_line(rel, size, sha256, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                         st.st_mtime_ns, blobs)
        self.lines.append(line)
        self.refs.add(blobs)
        self.stats.files += 1
        self.stats.bytes += size
        return line

    def _read(self, rel: str, fd: int, st: os.stat_result, cached_sha256: str | None,
              held: frozenset[str]) -> tuple[int, str, tuple[str, ...], bool]:
        """(size, SHA-256, blob ids, cacheable) of the open file (``st``: its fstat), read:
        its blobs go to the packer, but those of ``held`` (every live target holds them).

        A file changed within a clock tick of the read's start (:func:`_racy`) is not
        cacheable (git's "racily clean" rule): it could change again within the same tick,
        unseen by the next run's stat. Nor is one whose size changed while it was read. A
        file the cache knew by ``cached_sha256`` with the same stat (a re-read) that hashes
        to other bytes is warned about.

        Raises:
            _SourceError: reading the file failed (only this file is lost). What the packer
            raises otherwise (a pack that cannot be written or uploaded fails the run).
        """
        add = self.packer.add

        def piece(blob: str, data: bytes) -> None:
            if blob not in held:
                add(blob, data)

        started = time.time_ns()
        with io.FileIO(fd, "rb", closefd=False) as raw:
            found = packs.file_blobs(_Source(raw), self.key,  # type: ignore[arg-type]
                                     on_piece=piece if held else add)
        self.counts.files_read += 1
        self.counts.bytes_read += found.size
        if cached_sha256 is not None and found.size == st.st_size \
                and cached_sha256 != found.sha256:
            self.counts.stale += 1
            log.warning("uploads: %s changed without its size, mtime or ctime changing "
                        "(found by a re-read)", shown_path(rel))
        cacheable = found.size == st.st_size and not _racy(st, started)
        return found.size, found.sha256, tuple(found.blobs), cacheable


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


def _prover(ctx: Context, root: Path, key: bytes | None, cache_run: int,
            losses: Losses) -> Callable[[Sequence[str]], None]:
    """What to do once the backup is committed on ``stored`` targets: prove the folder
    blocks now in the cache (:func:`filecache.confirm`): those targets hold every blob they
    name, as of ``losses`` (read before the walk: a pack one of them loses since makes the
    proof not stand for it)."""

    def prove(stored: Sequence[str]) -> None:
        try:
            filecache.confirm(ctx.config.state_dir, root, key_fingerprint(key), cache_run,
                              losses.proof(stored))
        except sqlite3.Error as exc:  # only slower: the next backup asks about each blob
            log.warning("file cache: could not record which targets hold this backup's "
                        "blobs (%s)", exc)

    return prove


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
    with BlobIndex.open(ctx.config.state_dir) as index:
        floor = index.losses().count  # before the syncs: see Losses.holds
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
        live = [t.name for t in run.alive]
        losses = index.losses()
        packer = _Packer(ctx, run, index, key, counts)
        with FileCache.open(ctx.config.state_dir, root, key_fingerprint(key),
                            rehash_share=share, rehash_all=rehash) as cache, \
                index.refs_writer(run.backup_id) as refs:
            cutter = Cutter(key, _piece_to(packer, refs))
            stage = _Stage(packer, cache, key, cutter, counts, refs, losses, live, floor)
            try:
                stage.run(root)
                chunks = cutter.finish()
                packer.finish()
            except BaseException:
                packer.abort()
                raise
            cache.finish()
        run.on_commit.append(_prover(ctx, root, key, cache.run, losses))
        listing = b"".join(chunk.to_line() for chunk in chunks)
        run.store("uploads-index", "uploads.index.jsonl", "jsonl",
                  lambda out: out.write(listing))
    log.info("uploads: %d files (%d read, %d bytes), %d new blobs (%d bytes) in %d packs "
             "(%d bytes stored)", stage.stats.files, counts.files_read, counts.bytes_read,
             counts.blobs_new, counts.bytes_new, counts.packs, counts.bytes_stored)
    return stage.stats, {"format": "packs", "ids": "sha256" if key is None else "hmac-sha256",
                         "key_id": None if key is None else packs.key_id(key),
                         "index": "chunks"}


def _piece_to(packer: _Packer, refs: RefsWriter) -> Callable[[Chunk, bytes], None]:
    """Where a piece of the index goes (:class:`uploads_index.Cutter`): to the packer as a
    blob (stored where a target lacks it: an unchanged piece costs its hash), and into the
    backup's refs."""

    def take(chunk: Chunk, data: bytes) -> None:
        packer.add(chunk.id, data)
        refs.add((chunk.id,))

    return take
