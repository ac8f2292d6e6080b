"""Restoring, verifying and downloading packs-format uploads (issue 15; docs/packs.md).

A packs backup's uploads are its uploads index (every entry with its attributes, each file's
blob ids: the ``uploads-index`` artifact, or, since it is stored in pieces, the blobs that
artifact lists: :mod:`uploads_index`) plus blobs held in the target's packs, outside the
backup's folder. One copy is read so:

1. the index (checked against the manifest, decrypted; its pieces, if any, read from the
   packs as the blobs of one file are, below: :func:`read_index`) goes into a temporary
   SQLite file in ``state_dir/staging`` (:class:`Needs`): entries, and for each blob where
   it belongs (file, offset). Paths are checked on the way in with the tar extraction's
   rules (no absolute path, ``..`` or NUL; no entry through a symlink of the index; no
   entry twice);
2. the packs that hold needed blobs are found from the target's listing of ``packs/`` and
   the local pack cache (:class:`~conexa_backup.blobindex.BlobIndex`); a listed pack the
   cache does not know is read anyway (once: its blobs are used in the same pass) and
   recorded;
3. those packs are fetched by a small pool of threads (download, decrypt, decompress, check
   the name); the main thread writes each needed blob, checked against its id, wherever it
   belongs (``pwrite``), and is the only one touching SQLite and the cache;
4. a needed blob no good pack held means this copy lacks it: IntegrityError naming the
   backup, the target, the first files affected and the packs at fault, so that
   ``fetch.from_first_good`` records the damage and tries the next copy.

Memory stays flat in the number of files: entries and blob places live in SQLite, only
packs (a few thousand even for a large tree) are held in Python.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from conexa_backup import packs
from conexa_backup.actions.backup_packs import dedup_key
from conexa_backup.actions.fetch import Keys, read_plain
from conexa_backup.actions.uploads_index import (
    BATCH,
    CHUNKS_FILE,
    NAMED,
    Chunk,
    Counts,
    Needs,
    PieceCache,
    read_chunks,
)
from conexa_backup.blobindex import BlobIndex
from conexa_backup.catalog import Backup, Copy
from conexa_backup.errors import (
    IntegrityError,
    ObjectNotFoundError,
    UnsafeArchiveError,
    UnusableCopyError,
)
from conexa_backup.manifest import Manifest, shown_path
from conexa_backup.pipeline import CHUNK
from conexa_backup.scratch import scratch_name
from conexa_backup.storage.base import Target

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context

log = logging.getLogger(__name__)
T = TypeVar("T")

WORKERS = 4  # packs fetched at once: enough to hide a cloud round trip, few scratch files
WRITERS = 2  # threads checking and writing a pack's blobs while the next one is read
IN_FLIGHT = 16 << 20  # bytes of blobs handed to the writers and not yet written, at most


def read_index(ctx: Context, copy: Copy, backup_id: str, manifest: Manifest,
               consume: Callable[[IO[bytes]], T], *, run: PackRun | None = None,
               whole: bool = False) -> tuple[T, list[str]]:
    """Run ``consume`` on the copy's uploads index (plain JSON lines), checked: the artifact
    against the manifest and, for an index stored in pieces (:mod:`uploads_index`), each
    piece against its id as read from a good pack of the copy's target (``run`` and
    ``whole`` as for :class:`PackReading`). Returns what ``consume`` did and the pieces'
    blob ids (none for an index stored whole).

    Raises:
        IntegrityError: damaged: the artifact, or a piece in no good pack (naming the packs).
        UnusableCopyError: intact but unsafe, malformed or unreadable with this host's keys.
        StorageError: unreadable.
    """
    artifact = manifest.artifact("uploads-index")
    if artifact is None:
        raise IntegrityError(f"backup {backup_id}: manifest lists no uploads index")
    keys = ctx.keys()
    if manifest.uploads is None or manifest.uploads.index != "chunks":
        return read_plain(copy, backup_id, artifact, consume, keys), []
    chunks = read_plain(copy, backup_id, artifact, read_chunks, keys)
    where = f"target {copy.target.name!r}: backup {backup_id}"
    # Named as scratch: a run killed here leaves the joined index (an encrypted backup's in
    # plaintext) to the next run's sweep.
    folder = keys.staging / scratch_name(f"index-{secrets.token_hex(3)}")
    folder.mkdir(mode=0o700)
    try:
        path = folder / CHUNKS_FILE
        _join_pieces(ctx, copy, backup_id, manifest, chunks, path, run, whole)
        with path.open("rb") as plain:
            try:
                result = consume(plain)
            except UnsafeArchiveError as exc:  # every piece matched its id: intact
                raise UnusableCopyError(f"{where}: uploads index (every piece matches its "
                                        f"id): {exc}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result, [c.id for c in chunks]


def _join_pieces(ctx: Context, copy: Copy, backup_id: str, manifest: Manifest,
                 chunks: list[Chunk], path: Path, shared: PackRun | None,
                 whole: bool) -> None:
    """Write the index's pieces, in order, into the new file ``path``: those the ``shared``
    run read from this target already from its cache, the others from the target's packs
    (read as the blobs of one file, each checked against its id), then cached for it.

    Raises:
        IntegrityError: a piece is in no good pack. As :func:`fetch_packs` otherwise.
    """
    keys, target = ctx.keys(), copy.target.name
    run = shared or PackRun()
    key = dedup_key_for(ctx, manifest, f"target {target!r}: backup {backup_id}")
    with Needs(keys.staging) as needs, BlobIndex.open(ctx.config.state_dir) as index:
        needs.load_chunks(chunks)
        tree = _Tree(path.parent, needs)
        tree.create()
        offsets = list(itertools.accumulate((c.size for c in chunks), initial=0))
        cached = run.pieces.write(target, chunks, offsets, path)
        needs.found(cached)
        # The others must be written, so a pack this run has checked already is read again
        # (plan_packs would count its blobs as found unread); known bad ones are skipped.
        pieces_run = PackRun(listings=run.listings, checked={
            k: why for k, why in run.checked.items() if why is not None})
        reading = PackReading(copy.target, index, keys.staging, key,
                              identities_for(keys, manifest), pieces_run, whole=whole)
        try:
            fetch_packs(reading, needs, tree)
        finally:
            run.bytes_read += pieces_run.bytes_read
            for checked, why in pieces_run.checked.items():
                run.checked.setdefault(checked, why)
        damage = lacking(reading, needs, backup_id, of="its uploads index")
        if damage is not None:
            raise damage
    if shared is not None:
        shared.pieces.add(target, chunks, offsets, path, keys.staging)


def read_needs(ctx: Context, copy: Copy, backup_id: str, manifest: Manifest,
               piece_size: int = packs.PIECE_SIZE, *, run: PackRun | None = None,
               whole: bool = False) -> Needs:
    """The copy's uploads index (:func:`read_index`) loaded into :class:`Needs`; its
    ``chunks`` are the ids of the pieces it was stored in.

    Raises:
        As :func:`read_index`.
    """
    needs = Needs(ctx.keys().staging, piece_size)
    try:
        _, needs.chunks = read_index(ctx, copy, backup_id, manifest, needs.load, run=run,
                                     whole=whole)
    except BaseException:
        needs.close()
        raise
    return needs


# -- fetching packs -----------------------------------------------------------------------------

@dataclass
class PackRun:
    """What one run learned about targets' packs: each listing read once, and each pack
    checked at most once per target (``verify --all``): None when good, else the problem."""

    listings: dict[str, dict[str, int]] = field(default_factory=dict)
    checked: dict[tuple[str, str], str | None] = field(default_factory=dict)
    bytes_read: int = 0  # stored bytes of the packs read
    pieces: PieceCache = field(default_factory=PieceCache)  # index pieces read, by target

    def listing(self, target: Target) -> dict[str, int]:
        """Pack name -> stored size, for every pack ``target`` lists.

        Raises:
            StorageError: the target cannot be listed.
        """
        if target.name not in self.listings:
            found = {}
            for obj in target.list(packs.PACKS_PREFIX):
                name = packs.pack_name(obj.key)
                if name is not None:
                    found[name] = obj.size
            self.listings[target.name] = found
        return self.listings[target.name]


@dataclass
class PackReading:
    """How to read one copy's packs: the target, its blob keys, and what to do with blobs."""

    target: Target
    index: BlobIndex
    scratch: Path
    key: bytes | None
    identities: list[Any] | None
    run: PackRun = field(default_factory=PackRun)
    whole: bool = False  # check every blob of each pack read (verify), not only needed ones
    # Only check stored bytes against the name (no identity to decrypt them: a backup host);
    # what a pack holds then comes from the cache alone.
    stored_only: bool = False
    problems: dict[str, str] = field(default_factory=dict)  # pack -> why it is bad
    vanished: bool = False  # a listed pack was gone when read (in this pass)


def plan_packs(reading: PackReading, needs: Needs) -> list[str]:
    """The listed packs to read: known ones that hold a needed blob (and were not already
    proved good this run: their blobs count as found), and every unknown one."""
    target, run = reading.target, reading.run
    todo = []
    for name in sorted(run.listing(target)):
        checked = (target.name, name) in run.checked
        problem = run.checked.get((target.name, name))
        if problem is not None:
            reading.problems[name] = problem
            continue
        if not reading.index.known_pack(name):
            if not reading.stored_only:  # (it could not be read: nothing to learn)
                todo.append(name)  # read to learn what it holds, and used in the same pass
            continue
        held = sorted(needs.wanted_among([b for b, _ in reading.index.pack_blobs(name)]))
        if not held:
            continue
        if checked:  # read and proved good already in this run (verify --all)
            needs.found(held)
            continue
        todo.append(name)
    return todo


def fetch_packs(reading: PackReading, needs: Needs, tree: _Tree | None = None) -> None:
    """Read the packs of ``reading.target`` that hold what ``needs`` wants, :data:`WORKERS`
    at a time; write each needed blob (checked against its id) into ``tree``, if any, and
    mark it found. A damaged or vanished pack is recorded in ``reading.problems`` and the
    rest go on.

    Raises:
        UnusableCopyError: a pack is intact but encrypted to another identity, or keyed with
            another dedup key. StorageError: the target cannot be listed or read.
        What ``tree`` raises.
    """
    for _ in range(2):
        reading.vanished = False
        _fetch_listed(reading, needs, tree)
        if not reading.vanished or not needs.missing()[0]:
            return
        # A pack listed a moment ago is gone and blobs still lack: a prune may have repacked
        # them meanwhile (new pack first, old one deleted after). List again, once, and read
        # what is new before calling the copy damaged.
        log.info("target %s: a pack vanished while being read; listing packs again",
                 reading.target.name)
        reading.run.listings.pop(reading.target.name, None)


def _fetch_listed(reading: PackReading, needs: Needs, tree: _Tree | None) -> None:
    """One pass of :func:`fetch_packs` over the target's current listing."""
    target = reading.target
    listed = reading.run.listing(target)
    todo = collections.deque(plan_packs(reading, needs))

    def job(name: str) -> IO[bytes] | None:
        """Download, decrypt, decompress (the index is parsed by the main thread)."""
        if reading.stored_only:
            save_pack(target, name, None)
            return None
        with target.open(packs.pack_key(name)) as stored:
            return packs.unpack_content(name, stored, reading.scratch, reading.identities)

    pending: dict[futures.Future[IO[bytes] | None], str] = {}
    with futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="pack") as pool, \
            futures.ThreadPoolExecutor(WRITERS, thread_name_prefix="write") as writers:
        try:
            while todo or pending:
                while todo and len(pending) < WORKERS:
                    name = todo.popleft()
                    pending[pool.submit(job, name)] = name
                done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for future in done:
                    name = pending.pop(future)
                    _take(reading, needs, name, listed[name], future,
                          None if tree is None else _Writing(tree, writers))
        except BaseException:
            for future in pending:
                future.cancel()
            for future in pending:  # the ones already running: wait, then drop their files
                with contextlib.suppress(Exception):
                    content = future.result()
                    if content is not None:
                        content.close()
            raise


def _take(reading: PackReading, needs: Needs, name: str, size: int,
          future: futures.Future[IO[bytes] | None], writing: _Writing | None) -> None:
    """Use one fetched pack (main thread): record it, write its needed blobs, or record why
    it is bad."""
    key = (reading.target.name, name)
    try:
        content = future.result()
        opened = None if content is None else packs.opened(name, content, reading.key)
    except ObjectNotFoundError as exc:
        reading.problems[name] = f"pack {name} vanished from target {reading.target.name!r}"
        reading.vanished = True
        log.warning("target %s: %s", reading.target.name, exc)
        return
    except IntegrityError as exc:
        _bad(reading, name, exc)
        return
    if opened is None:  # stored bytes checked only: the cache says what it holds
        needs.found(needs.wanted_among([b for b, _ in reading.index.pack_blobs(name)]))
        reading.run.checked[key] = None
        reading.run.bytes_read += size
        return
    with opened:
        if not reading.index.known_pack(name):
            reading.index.add_pack(name, ((b.id, b.length) for b in opened.refs()),
                                   [(reading.target.name, size)])
        refs = list(opened.refs())
        wanted = needs.wanted_among([ref.id for ref in refs])
        try:
            needed = [ref for ref in refs if ref.id in wanted]
            if writing is not None:
                writing.pack(opened, needs, needed)
            else:
                for ref in needed:
                    opened.read_ref(ref)
                    needs.found([ref.id])
            if reading.whole:  # verify: the blobs no backup here needs are checked too
                for ref in refs:
                    if ref.id not in wanted:
                        opened.read_ref(ref)
        except IntegrityError as exc:
            _bad(reading, name, exc)
            return
    reading.run.checked[key] = None
    reading.run.bytes_read += size


class _Writing:
    """A pack's needed blobs, checked against their ids and written into the tree by
    :data:`WRITERS` threads (hashing and ``pwrite`` release the GIL) while the main thread
    reads on: a job per :data:`BATCH` blobs (a future per tiny blob would cost more than
    the blob), and at most :data:`IN_FLIGHT` bytes or twice as many jobs as threads
    waiting, so memory stays flat whatever a pack holds."""

    def __init__(self, tree: _Tree, pool: futures.ThreadPoolExecutor) -> None:
        self.tree, self.pool = tree, pool

    def pack(self, opened: packs.OpenedPack, needs: Needs, refs: list[packs.BlobRef]) -> None:
        """Check and write ``refs`` (all wanted; maybe none), then mark found those that
        were; every write has ended when this returns, whatever it raises.

        Raises:
            IntegrityError: a blob does not match its id (the others were written).
            What :meth:`_Tree.put` raises.
        """
        jobs: collections.deque[tuple[int, futures.Future[_Written]]] = collections.deque()
        done: list[str] = []
        problems: list[BaseException] = []

        def settle() -> int:
            size, job = jobs.popleft()
            try:
                good, bad = job.result()
                done.extend(good)
                if bad is not None:
                    problems.append(bad)
            except BaseException as exc:  # raised below, once every write has ended
                problems.append(exc)
            return size

        with opened.mapped() as whole:
            waiting = 0
            try:
                for chunk in _chunks(refs):
                    places = needs.places_among([ref.id for ref in chunk])  # this thread's
                    pieces = [(ref, opened.read_unchecked(ref) if whole is None
                               else whole[ref.offset:ref.offset + ref.length],
                               places.get(ref.id, [])) for ref in chunk]
                    size = sum(ref.length for ref in chunk)
                    jobs.append((size, self.pool.submit(self._put_all, opened, pieces)))
                    waiting += size
                    del pieces  # no slice of the mapping outlives it
                    while jobs and (waiting > IN_FLIGHT or len(jobs) > 2 * WRITERS):
                        waiting -= settle()
            finally:
                while jobs:
                    settle()
                needs.found(done)
        for exc in problems:  # damage names the pack; anything else is worse: raise it
            if not isinstance(exc, IntegrityError):
                raise exc
        if problems:
            raise problems[0]

    def _put_all(self, opened: packs.OpenedPack, pieces: list[_Piece]) -> _Written:
        """Check and write each piece (a writer thread); the ids written, and the first
        blob that failed its check (the others are written all the same)."""
        good: list[str] = []
        bad: IntegrityError | None = None
        for ref, data, where in pieces:
            try:
                opened.check(ref, data)
            except IntegrityError as exc:
                bad = bad or exc
                continue
            self.tree.put(where, data)
            good.append(ref.id)
        return good, bad


_Piece = tuple[packs.BlobRef, "bytes | memoryview", list[tuple[bytes, int, int]]]
_Written = tuple[list[str], IntegrityError | None]


def _chunks(refs: list[packs.BlobRef]) -> Iterator[list[packs.BlobRef]]:
    """``refs`` in runs of at most :data:`BATCH` blobs and about 4 MiB (a larger blob
    alone)."""
    chunk: list[packs.BlobRef] = []
    size = 0
    for ref in refs:
        if chunk and (len(chunk) >= BATCH or size + ref.length > 4 << 20):
            yield chunk
            chunk, size = [], 0
        chunk.append(ref)
        size += ref.length
    if chunk:
        yield chunk


def _bad(reading: PackReading, name: str, exc: IntegrityError) -> None:
    """Pack ``name`` is proven damaged: say why, and tell the pack cache, so that the next
    backup stores its blobs again instead of trusting it (and every later backup with it)."""
    reading.problems[name] = reading.run.checked[(reading.target.name, name)] = str(exc)
    log.warning("target %s: %s", reading.target.name, exc)
    reading.index.mark_bad(reading.target.name, name, str(exc))


def lacking(reading: PackReading, needs: Needs, backup_id: str,
            of: str | None = None) -> IntegrityError | None:
    """The damage when some needed blob was in no good pack: which backup and target, how
    many blobs and files, the first files, and the packs at fault (damaged, or missing from
    the target though this host's cache says they held the blobs); None when nothing lacks.
    ``of`` names what lacks them, when not files (the index)."""
    count, files, first, blobs = needs.missing()
    if not count:
        return None
    target = reading.target.name
    listed = reading.run.listing(reading.target)
    culprits: list[str] = []
    for blob in blobs:
        for pack in reading.index.packs_with(blob):
            why = reading.problems.get(pack) or (
                None if pack in listed else f"pack {pack} is not on target {target!r}")
            if why and why not in culprits:
                culprits.append(why)
    if not culprits:
        culprits = list(reading.problems.values())
    more = f" and {files - len(first)} more" if files > len(first) else ""
    why = "; ".join(culprits[:NAMED]) or "no pack on the target holds them"
    what = of or (f"{files} file(s) ({', '.join(first)}{more})" if files else
                  "its files (their names need the age identity)")
    return IntegrityError(f"backup {backup_id}: target {target!r} lacks {count} blob(s) of "
                          f"{what}: {why}")


# -- restore -------------------------------------------------------------------------------------

def dedup_key_for(ctx: Context, manifest: Manifest, where: str) -> bytes | None:
    """The dedup key this backup's blob ids are keyed with (None for plain SHA-256 ids).

    Raises:
        UnusableCopyError: ids are keyed and this host has no such key, or another one.
        ConfigError: the key file is unreadable.
    """
    up = manifest.uploads
    if up is None or up.ids != "hmac-sha256":
        return None
    key = dedup_key(ctx)
    if key is None:
        raise UnusableCopyError(f"{where}: blob ids are keyed (dedup key {up.key_id}): set "
                                "encryption.dedup_key_file where restores run")
    if up.key_id is not None and packs.key_id(key) != up.key_id:
        raise UnusableCopyError(f"{where}: blob ids are keyed with dedup key {up.key_id}, "
                                f"not this one ({packs.key_id(key)})")
    return key


def identities_for(keys: Keys, manifest: Manifest) -> list[Any] | None:
    """Age identities when the backup is encrypted (ConfigError when none is configured),
    else None."""
    artifact = manifest.artifact("uploads-index")
    return keys.identities() if artifact is not None and artifact.encryption else None


def extract_copy(ctx: Context, backup: Backup, copy: Copy, manifest: Manifest,
                 staging: Path, piece_size: int = packs.PIECE_SIZE) -> Counts:
    """Rebuild the uploads of one packs-format copy in the new folder ``staging``; return
    what it made. On failure ``staging`` is left for the caller to remove.

    Raises:
        IntegrityError: the index is damaged, or some blob is in no good pack on the copy's
            target (naming the backup, the target, the first files and the packs).
        UnusableCopyError: intact but unsafe, malformed, or unreadable with this host's keys.
        StorageError: the target cannot be read. OSError: writing ``staging`` failed.
    """
    keys = ctx.keys()
    where = f"target {copy.target.name!r}: backup {backup.id}"
    key = dedup_key_for(ctx, manifest, where)
    with read_needs(ctx, copy, backup.id, manifest, piece_size) as needs, \
            BlobIndex.open(ctx.config.state_dir) as index:
        staging.mkdir(mode=0o700)
        tree = _Tree(staging, needs)
        tree.create()
        reading = PackReading(copy.target, index, keys.staging, key,
                              identities_for(keys, manifest))
        fetch_packs(reading, needs, tree)
        damage = lacking(reading, needs, backup.id)
        if damage is not None:
            raise damage
        tree.finish()
        return needs.counts


class _Tree:
    """The restored tree in ``root``: made from :class:`Needs`, written blob by blob, its
    attributes set at the end (symlinks last, never written through; folders deepest
    first)."""

    def __init__(self, root: Path, needs: Needs) -> None:
        self.root, self.needs = root, needs
        self.owners = os.geteuid() == 0

    def _path(self, rel: bytes) -> Path:
        # A name that is not UTF-8 stays its bytes (surrogate escapes, see os.fsdecode).
        return self.root if rel == b"." else self.root / os.fsdecode(rel)

    def _refuse(self, rel: bytes, why: str) -> UnusableCopyError:
        return UnusableCopyError(f"uploads index: cannot make "
                                 f"{shown_path(os.fsdecode(rel))}: {why}")

    def create(self) -> None:
        """Every folder, then every file (0600, sized, empty), in index order. Nothing in
        ``root`` is a link yet, and no entry lies through one of the index's (Needs.load)."""
        for rel, *_ in self.needs.entries("dir"):
            try:
                self._path(rel).mkdir(0o700, parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as exc:
                raise self._refuse(rel, str(exc.strerror)) from None
        made = {self.root}
        for rel, *_, size, _target in self.needs.entries("file"):
            path = self._path(rel)
            try:
                if path.parent not in made:  # an index lists folders first; a stat saved
                    path.parent.mkdir(0o700, parents=True, exist_ok=True)
                    made.add(path.parent)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except (FileExistsError, NotADirectoryError) as exc:
                raise self._refuse(rel, str(exc.strerror)) from None
            try:
                os.ftruncate(fd, size or 0)
            finally:
                os.close(fd)

    def put(self, where: list[tuple[bytes, int, int]], data: bytes | memoryview) -> None:
        """Write ``data`` (a blob, checked) at each of ``where`` (:meth:`Needs.places_among`);
        thread-safe: it only opens and writes files the tree made.

        Raises:
            UnusableCopyError: the index's file size does not fit the blob's length.
        """
        for rel, offset, length in where:
            if len(data) != length:
                raise self._refuse(rel, f"piece at {offset} is {len(data)} bytes, the "
                                   f"index's size says {length}")
            fd = os.open(self._path(rel), os.O_WRONLY | os.O_NOFOLLOW)
            try:
                view, at = memoryview(data), offset
                while view:
                    n = os.pwrite(fd, view, at)
                    view, at = view[n:], at + n
            finally:
                os.close(fd)

    def _attrs(self, path: Path, mode: int | None, uid: int | None, gid: int | None,
               mtime_ns: int | None, link: bool = False) -> None:
        if self.owners and uid is not None and gid is not None:
            os.chown(path, uid, gid, follow_symlinks=False)  # lchown for a link
        if mode is not None and not link:  # set-id bits never restored (as for a tar)
            path.chmod(stat.S_IMODE(mode) & 0o1777)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)

    def finish(self) -> None:
        """Files' attributes, then symlinks (exactly as stored), then folders' attributes,
        deepest first, the root last."""
        for rel, mode, uid, gid, mtime_ns, _size, _target in self.needs.entries("file"):
            self._attrs(self._path(rel), mode, uid, gid, mtime_ns)
        for rel, _mode, uid, gid, mtime_ns, _size, target in self.needs.entries("symlink"):
            path = self._path(rel)
            path.parent.mkdir(0o700, parents=True, exist_ok=True)
            try:
                path.symlink_to(os.fsdecode(target))  # the text as stored, never resolved
            except FileExistsError:
                raise self._refuse(rel, "stored twice") from None
            self._attrs(path, None, uid, gid, mtime_ns, link=True)
        root = None
        for rel, mode, uid, gid, mtime_ns, _size, _target in self.needs.entries(
                "dir", deepest_first=True):
            if rel == b".":
                root = (mode, uid, gid, mtime_ns)
                continue
            self._attrs(self._path(rel), mode, uid, gid, mtime_ns)
        if root is not None:
            self._attrs(self.root, *root)


# -- verify --------------------------------------------------------------------------------------


def save_pack(target: Target, name: str, dest: Path | None) -> int:
    """Copy pack ``name`` as stored to ``dest`` (0600; None: read and hash only), checked
    against its name; nothing left on failure. Returns its size.

    Raises:
        IntegrityError: the stored bytes do not match the name. StorageError: unreadable.
    """
    digest, size = hashlib.sha256(), 0
    out = None
    if dest is not None:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        out = os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                                0o600), "wb")
    try:
        with target.open(packs.pack_key(name)) as stored:
            while data := stored.read(CHUNK):
                digest.update(data)
                size += len(data)
                if out is not None:
                    out.write(data)
        if out is not None:
            out.close()
        if digest.hexdigest() != name:
            raise IntegrityError(f"pack {name}: stored bytes do not match its name "
                                 f"(SHA-256 {digest.hexdigest()}): the pack is damaged")
    except BaseException:
        if out is not None and dest is not None:
            out.close()
            dest.unlink(missing_ok=True)
        raise
    return size
