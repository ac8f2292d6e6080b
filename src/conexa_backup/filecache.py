"""The file cache: skip reading uploads that have not changed since the last backup (issue 15).

One SQLite file in ``state_dir/filecache/`` per uploads root and per dedup-key fingerprint (a
changed key or root never reuses ids computed under another), 0600 in a 0700 folder. For each
file it keeps what the file was when last read (its lstat) and what the backup computed then:
its blob ids (opaque lowercase hex strings, defined by the packs code), the whole file's SHA-256
and its line of the uploads index.

Files are kept a folder at a time, in **folder blocks** (:mod:`folderblocks`), read ahead in the
walk's order. A run::

    with FileCache.open(state_dir, root, fingerprint) as cache:
        for each folder, as the walk enters it:
            folder = cache.folder(rel)
            for each file in it:
                at = folder.take(name, stat_text(st))     # None: new or changed
                if at is not None and not cache.chosen(folder.place(at)):
                    folder.keep(at)                       # unchanged: not read
                else:
                    ... read it ...; folder.add(name, ...)
            cache.leave(folder)                           # written only if it changed
        cache.finish()                                    # only after a complete walk

A folder of more than a block's worth of files is cached file by file instead (:meth:`lookup`,
:meth:`record`, :meth:`forget`, :meth:`should_rehash`; :meth:`spill`), each run marking the
paths it meets unchanged so that :meth:`finish` drops the others in one ``DELETE``. Nothing
holds a set of every path in Python: memory stays flat in the number of files. Writes are
committed every ``batch`` statements: a killed run loses at most one batch and never leaves a
torn file (SQLite's WAL). A cache that cannot be opened or is found corrupt is moved aside
(``*.corrupt-<time>``) and rebuilt empty, with a warning: it is only a cache.

The cache says what a file's bytes hashed to. Whether a target holds a blob is the pack index's
question; a committed backup records a proof (:func:`confirm`) that lets the next run skip it
for whole folders (see :mod:`folderblocks` and ``BlobIndex.losses``).

A small share of cached files is read again each run (:meth:`FileCache.chosen`, see
:func:`rehash_chosen`) so a file changed with its mtime put back cannot hide behind the cache
forever; ``rehash_all`` (``--rehash``) reads them all.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import sqlite3
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from conexa_backup.folderblocks import FIELDS, SCHEMA, Block, BlockStream, Folder, order_key
from conexa_backup.logs import LOGGER
from conexa_backup.manifest import shown_path as shown
from conexa_backup.state import private_dir

log = logging.getLogger(LOGGER)

FOLDER: Final = "filecache"
DEFAULT_BATCH: Final = 2000
DEFAULT_REHASH_SHARE: Final = 0.01
BUSY_TIMEOUT_MS = 5000  # how long an open waits for another run's write lock
_SLOTS: Final = 1 << 32  # the rehash wheel's size: shares are rounded to 1/2**32
_HEX = re.compile(r"[0-9a-f]+")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY,
    dir BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blobs TEXT NOT NULL,
    seen INTEGER NOT NULL,
    written INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_dir ON files (dir);
"""
KEEP_BATCH = 256  # rows of folders gone deleted together
FILES_AHEAD: Final = 512  # file-by-file entries of a folder read in one query, or marked seen
SCHEMA_VERSION = "5"  # 2: the dir column; 3: folder blocks; 4: CRC-32, lines as bytes;
# 5: files.written (a spilled folder's files are proven as blocks are)


@dataclass(frozen=True, slots=True)
class Entry:
    """What a file hashed to when it was last read, with the stat it had then."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    blobs: tuple[str, ...]
    sha256: str
    written: int = 0  # the run that wrote it (what a proof covers: see folderblocks)

    def matches(self, st: os.stat_result) -> bool:
        """Whether ``st`` (an lstat or fstat) describes the file as it was when read."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def key_fingerprint(key: bytes | None) -> str:
    """A name for a dedup key that reveals nothing about it (HMAC of a constant under the key);
    ``"unkeyed"`` for None (blob ids are plain SHA-256, without encryption).

    Two caches made under different keys get different fingerprints, hence different files.
    """
    if key is None:
        return "unkeyed"
    return hmac.new(key, b"conexa-backup filecache v1", hashlib.sha256).hexdigest()


def cache_path(state_dir: Path, root: Path, fingerprint: str) -> Path:
    """The cache file for the uploads ``root`` (made absolute) under ``fingerprint``."""
    name = hashlib.sha256(f"{Path(root).absolute()}\0{fingerprint}".encode()).hexdigest()
    return Path(state_dir) / FOLDER / f"{name[:32]}.sqlite"


def rehash_chosen(salt: bytes, run: int, rel_path: str, share: float) -> bool:
    """Whether run number ``run`` re-reads the cached file ``rel_path`` (``share`` in [0, 1]).

    Each path gets a fixed place on a wheel of 2**32 slots (BLAKE2b keyed with the cache's
    random ``salt``: fast enough for a million paths); run ``r`` re-reads the paths whose place
    falls in the window
    ``[r * step, (r + 1) * step)`` (mod 2**32), with ``step = ceil(share * 2**32)``. So each run
    re-reads about ``share`` of the files (the places are uniform), the choice is a pure function
    of (salt, run, path), and the window walks round the wheel without gaps: **every cached file
    is re-read at least once in any ceil(1 / share) consecutive runs** (100 at 1%), not only in
    expectation. ``share`` 0 never re-reads; 1 always does.

    Raises:
        ValueError: ``share`` is outside [0, 1], or ``salt`` is longer than 64 bytes.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"rehash share must be between 0 and 1, not {share}")
    step = _step(share)
    if step == 0:
        return False
    return _in_window(wheel_place(salt, rel_path), run, step)


def _in_window(place: int, run: int, step: int) -> bool:
    """Whether ``place`` is in run ``run``'s window of the rehash wheel (see
    :func:`rehash_chosen`)."""
    return (place - run * step) % _SLOTS < step


def wheel_place(salt: bytes, rel_path: str) -> int:
    """The fixed place of ``rel_path`` on the rehash wheel (see :func:`rehash_chosen`)."""
    digest = hashlib.blake2b(_encode(rel_path), key=salt, digest_size=4).digest()
    return int.from_bytes(digest, "big")


def _step(share: float) -> int:
    return min(_SLOTS, math.ceil(share * _SLOTS))  # rounded up: the guarantee holds


def _busy(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite waiting for a lock (not a sign of a broken file)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _parent(rel_path: str) -> str:
    """The folder holding ``rel_path`` (relative to the root; ``"."`` for the root)."""
    parent = rel_path.rpartition("/")[0]
    return parent or "."


def _encode(rel_path: str) -> bytes:
    # os.fsdecode gives undecodable names as surrogates: keep their bytes as they are
    return rel_path.encode("utf-8", "surrogateescape")


class FileCache:
    """An open file cache for one run; use :meth:`open` (a context manager).

    Not thread-safe: one walker calls it.
    """

    def __init__(
        self,
        path: Path,
        *,
        rehash_share: float = DEFAULT_REHASH_SHARE,
        rehash_all: bool = False,
        batch: int = DEFAULT_BATCH,
        seed: bytes | None = None,
    ) -> None:
        """Open (or create, or rebuild) the cache file ``path`` and start a run in it.

        Prefer :meth:`open`. ``seed`` replaces the cache's stored random salt for the rehash
        choice (tests); ``batch`` is how many writes go in one transaction.

        Raises:
            ValueError: ``rehash_share`` outside [0, 1] or ``batch`` < 1.
            sqlite3.OperationalError: another process holds the cache's write lock for
                longer than ``BUSY_TIMEOUT_MS`` (the file is left alone).
            OSError, sqlite3.Error: the cache cannot be created even empty.
        """
        if not 0.0 <= rehash_share <= 1.0:
            raise ValueError(f"rehash share must be between 0 and 1, not {rehash_share}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        self.path = path
        self.rehash_share = rehash_share
        self.rehash_all = rehash_all
        self.batch = batch
        self._pending = 0
        self._db: sqlite3.Connection | None = None
        self._step = _step(rehash_share)
        self._blocks = BlockStream(lambda: self._conn)
        self._seen: list[bytes] = []  # file-by-file matches not marked seen yet
        private_dir(path.parent)  # failing here is no reason to blame the cache file
        try:
            self._start()
        except (sqlite3.Error, OSError, ValueError) as exc:
            if _busy(exc):  # another run holds it: theirs to use, not ours to move aside
                self.close()
                raise
            self._discard(exc)
            self._start()
        self.salt = seed if seed is not None else self._salt

    @classmethod
    def open(
        cls,
        state_dir: Path,
        root: Path,
        fingerprint: str,
        *,
        rehash_share: float = DEFAULT_REHASH_SHARE,
        rehash_all: bool = False,
        batch: int = DEFAULT_BATCH,
        seed: bytes | None = None,
    ) -> FileCache:
        """The cache of uploads ``root`` under the dedup key ``fingerprint``, a new run begun.

        Raises: as :class:`FileCache`.
        """
        return cls(
            cache_path(state_dir, root, fingerprint),
            rehash_share=rehash_share,
            rehash_all=rehash_all,
            batch=batch,
            seed=seed,
        )

    def __enter__(self) -> FileCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- opening -----------------------------------------------------------------------------

    def _start(self) -> None:
        """Connect, make sure the file is a cache (damage is found when read: see
        :meth:`_rebuild`), begin a run (its number committed at once)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # 0600 before SQLite sees it
        os.close(fd)
        self.path.chmod(0o600)  # SQLite gives its -wal and -shm files the database's mode
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        # A new file only: a folder's block (a few KB) then fits its page, no overflow chain.
        db.execute("PRAGMA page_size = 16384")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash loses commits, never the file
        db.execute("PRAGMA cache_size = -8000")  # 8 MB of pages, whatever the table's size
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = db.execute("SELECT v FROM meta WHERE k = 'version'").fetchone() \
            if "meta" in tables else None
        if "files" in tables and version != (SCHEMA_VERSION,):  # older: a cache, start again
            log.info("file cache %s: older format, starting it again", self.path)
            db.executescript("DROP TABLE IF EXISTS files; DROP TABLE IF EXISTS folders; "
                             "DELETE FROM meta WHERE k IN ('run', 'proof', 'proof_run');")
        db.executescript(_SCHEMA + SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        self.run = int(meta.get("run", "0")) + 1
        # What the last committed backup proved, and of which run (see folderblocks).
        self.proof: tuple[int, str] | None = (int(meta["proof_run"]), meta["proof"]) \
            if "proof" in meta and "proof_run" in meta else None
        salt = meta.get("salt") or secrets.token_hex(16)
        self._salt = bytes.fromhex(salt)
        db.executemany(
            "INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
            [("run", str(self.run)), ("salt", salt), ("version", SCHEMA_VERSION)],
        )
        db.execute("COMMIT")
        db.execute("BEGIN")

    def _discard(self, exc: BaseException) -> None:
        """Move an unusable cache file aside (with its WAL) and warn; the next start is empty."""
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):  # closing what is broken: moved aside next
                self._db.close()
            self._db = None
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
        log.warning(
            "file cache %s unusable (%s): moved aside to %s, starting empty "
            "(every file is read again this run)",
            self.path,
            exc,
            aside.name,
        )
        if self.path.exists():
            self.path.replace(aside)
        for suffix in ("-wal", "-shm", "-journal"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the file cache is closed")
        return self._db

    # -- a run ---------------------------------------------------------------------------------

    def lookup(self, rel_path: str, st: os.stat_result) -> Entry | None:
        """The cached entry of ``rel_path`` if its size, mtime_ns, ctime_ns and inode all match
        ``st``; else None (the file must be read).

        A match is marked seen by this run (one ``UPDATE … RETURNING``), so :meth:`finish`
        keeps it; an entry that does not match is not, so :meth:`finish` drops it unless
        :meth:`record` writes it again. A match this run does not use must be passed to
        :meth:`forget` or :meth:`record`: a seen entry is one this run vouched for (a proof
        covers it: see :mod:`folderblocks`). Raises ``sqlite3.OperationalError`` (disk full,
        locked…); a corrupt file is moved aside and the lookup answers None.
        """
        try:
            row = self._conn.execute(
                "UPDATE files SET seen = ? WHERE path = ? AND size = ? AND mtime_ns = ? "
                "AND ctime_ns = ? AND inode = ? RETURNING blobs, sha256, written",
                (self.run, _encode(rel_path), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                 st.st_ino),
            ).fetchone()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return None
        self._wrote()
        if row is None:
            return None
        blobs, sha256, written = row
        return Entry(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
                     tuple(blobs.split(",")) if blobs else (), sha256, written)

    def should_rehash(self, rel_path: str) -> bool:
        """Whether this run reads ``rel_path`` again although the cache matches (see
        :func:`rehash_chosen`; always with ``rehash_all``)."""
        return self.rehash_all or rehash_chosen(self.salt, self.run, rel_path, self.rehash_share)

    def files_of(self, dir_rel: str) -> FolderFiles:
        """The file-by-file entries of folder ``dir_rel``, for looking up its files in the
        walk's order (:class:`FolderFiles`)."""
        return FolderFiles(self, dir_rel)

    def _files_after(self, dir_key: bytes, after: bytes | None) -> list[Any]:
        """Up to FILES_AHEAD entries of folder ``dir_key`` after path ``after``, in path
        order. Raises ``sqlite3.OperationalError``; a corrupt file is moved aside (none)."""
        try:
            return self._conn.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, blobs, sha256, written "
                "FROM files WHERE dir = ? AND path > ? ORDER BY path LIMIT ?",
                (dir_key, after or b"", FILES_AHEAD)).fetchall()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return []

    def _saw(self, path: bytes) -> None:
        self._seen.append(path)
        if len(self._seen) >= FILES_AHEAD:
            self._mark_seen()

    def _mark_seen(self) -> None:
        """Mark the matches :class:`FolderFiles` found seen by this run, in one statement."""
        seen, self._seen = self._seen, []
        if seen:
            self._write("UPDATE files SET seen = ? WHERE path = ?",
                        ((self.run, p) for p in seen), many=True)

    def forget(self, rel_path: str) -> None:
        """Drop the entry of ``rel_path``: :meth:`lookup` matched it, but this run did not
        use it (the file is read again; what it reads is :meth:`record`-ed if cacheable).

        Raises ``sqlite3.OperationalError``; a corrupt file is moved aside.
        """
        self._write("DELETE FROM files WHERE path = ?", (_encode(rel_path),))

    def record(self, rel_path: str, st: os.stat_result, blobs: list[str], sha256: str) -> None:
        """Remember that ``rel_path``, as ``st`` describes it, hashed to ``blobs`` and
        ``sha256`` (and mark it seen by this run).

        Stat ``st`` *before* reading the file: a change while it is read then shows next run.

        Raises:
            ValueError: a blob id or ``sha256`` is not lowercase hex.
            sqlite3.OperationalError: the write failed (disk full…); a corrupt file is moved
                aside and the record goes into the new, empty cache.
        """
        for value in (*blobs, sha256):
            if not _HEX.fullmatch(value):
                raise ValueError(f"not a lowercase hex id: {value!r}")
        values = (
            _encode(rel_path),
            _encode(_parent(rel_path)),
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            sha256,
            ",".join(blobs),
            self.run,
            self.run,
        )
        sql = "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        if not self._write(sql, values):  # found corrupt, moved aside: into the new cache
            self._write(sql, values)

    # -- folder blocks (see folderblocks) --------------------------------------------------

    def folder(self, dir_rel: str) -> Folder:
        """Folder ``dir_rel`` (``"."``: the root) as this run meets it, with its block when
        it has one; ask in the walk's order (each folder before its contents, names sorted):
        blocks are read ahead in that order. Marks nothing: see :meth:`leave`.

        Raises ``sqlite3.OperationalError``; a corrupt file is moved aside, and a block that
        cannot be decoded counts as none (its files are read again).
        """
        try:
            block = self._blocks.get(dir_rel)
            if len(self._blocks.gone) >= KEEP_BATCH:
                self._drop_gone()
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            block = None
        except (ValueError, UnicodeError):
            log.warning("file cache %s: folder %s unreadable, its files are read again",
                        self.path, shown(dir_rel))
            block = None
        return Folder(dir_rel, block)

    def place(self, rel_path: str) -> int:
        """``rel_path``'s place on this cache's rehash wheel."""
        return wheel_place(self.salt, rel_path)

    def chosen(self, place: int) -> bool:
        """Whether this run reads again the file at ``place`` although it looks unchanged
        (the choice of :meth:`should_rehash`, from a stored place)."""
        return self.rehash_all or _in_window(place, self.run, self._step)

    def leave(self, folder: Folder) -> None:
        """The walk is through ``folder``: write its block when it changed (as written by
        this run: :func:`confirm` proves it once the backup is committed), else leave it.

        Raises ``sqlite3.OperationalError``; a corrupt file is moved aside.
        """
        if folder.per_file:
            self._mark_seen()
            return  # the row stays a marker
        if not folder.dirty:
            return  # the row stays as it is (none: a folder without files)
        key = order_key(folder.rel)
        if folder.count:
            self._write("INSERT OR REPLACE INTO folders VALUES (?, ?, 0, ?)",
                        (key, self.run, folder.encoded()))
        else:
            self._write("DELETE FROM folders WHERE key = ?", (key,))

    def spill(self, folder: Folder) -> None:
        """``folder`` grew too large for a block: cache its records file by file
        (:meth:`lookup`, :meth:`record` from now on; those of files not met yet unmarked, so
        that :meth:`finish` drops them if they are not met), its row a marker.

        Raises ``sqlite3.OperationalError``; a corrupt file is moved aside.
        """
        # Written by this run, all of them: only this run's commit proves them (some were
        # read now, and a block's ``written`` is the run that last wrote any of its files).
        # A generator, not a list: the rows of a folder this large would double its memory.
        rows = ((_encode(path), _encode(folder.rel), *numbers, sha256, blobs,
                 self.run if met else 0, self.run)
                for path, numbers, sha256, blobs, met in folder.records())
        if self._write("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       rows, many=True) \
                and self._write("INSERT OR REPLACE INTO folders VALUES (?, ?, 1, x'')",
                                (order_key(folder.rel), self.run)):
            folder.spilled()

    def _drop_gone(self, *, rest: bool = False) -> None:
        """Delete the rows of folders the walk passed (gone); with ``rest``, also every row
        after the last folder it entered (a complete walk only)."""
        self._blocks.drop_gone()
        if rest and self._blocks.asked is not None:
            self._conn.execute("DELETE FROM folders WHERE key > ?", (self._blocks.asked,))

    def finish(self) -> int:
        """End a complete run: drop every entry this run did not see (deleted or moved files
        and folders), commit, and return how many files cached file by file were dropped. A
        corrupt file found now is moved aside (0 dropped); ``sqlite3.OperationalError``
        (disk full…) is raised.

        Call it only after the whole tree was walked: a run that stopped early must just
        :meth:`close`, or the files it did not reach would lose their entries.
        """
        try:
            self._drop_gone(rest=True)
            self._mark_seen()
            dropped = self._conn.execute("DELETE FROM files WHERE seen <> ?", (self.run,)).rowcount
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)  # the new cache is empty: nothing to drop
            return 0
        db = self._conn
        db.execute("COMMIT")
        self._pending = 0
        db.execute("BEGIN")
        return int(dropped)

    def close(self) -> None:
        """Commit what this run wrote (every record is true whether or not the run ended) and
        close. Idempotent."""
        if self._db is None:
            return
        try:
            with contextlib.suppress(sqlite3.Error):  # only a cache's
                self._drop_gone()
                self._mark_seen()
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        finally:
            self._db.close()
            self._db = None

    def __len__(self) -> int:
        """How many files the cache holds (in blocks, and file by file)."""
        blocks = (Block(raw, 0, False) for (raw,) in self._conn.execute(
            "SELECT recs FROM folders"))
        return int(self._conn.execute("SELECT count(*) FROM files").fetchone()[0]) \
            + sum(len(b.fields) // FIELDS for b in blocks)

    def _write(self, sql: str, params: Any, *, many: bool = False) -> bool:
        """Run one writing statement (``many``: once for each row ``params`` yields) and
        count it (:meth:`_wrote`). False when the file was found corrupt: it is moved aside
        and the run goes on in an empty cache. Raises ``sqlite3.OperationalError`` (disk
        full…)."""
        try:
            if many:
                self._conn.executemany(sql, params)
            else:
                self._conn.execute(sql, params)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as exc:
            self._rebuild(exc)
            return False
        self._wrote()
        return True

    def _wrote(self) -> None:
        """Count one write; commit the batch when it is full."""
        self._pending += 1
        if self._pending >= self.batch:
            db = self._conn
            db.execute("COMMIT")
            db.execute("BEGIN")
            self._pending = 0

    def _rebuild(self, exc: BaseException) -> None:
        """Corruption found mid-run: start this run again in an empty cache."""
        self._discard(exc)
        self._pending = 0
        self._start()
        self._blocks.stop()  # the new file is empty: nothing to read ahead


def confirm(state_dir: Path, root: Path, fingerprint: str, run: int, proof: str) -> None:
    """After the backup of run ``run`` was committed: record ``proof`` (:meth:`Losses.proof`
    of the targets that hold it) for every folder block now in the cache (each took part in
    that run), so the next run need not ask about their blobs one by one. A no-op when a
    later run has begun.

    Raises:
        sqlite3.Error: the cache could not be written (only slower: the next run asks).
    """
    path = cache_path(state_dir, root, fingerprint)
    # mode=rw: never create a file here (a cache removed meanwhile stays removed)
    db = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True,
                         isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        db.execute("BEGIN IMMEDIATE")
        if db.execute("SELECT v FROM meta WHERE k = 'run'").fetchone() == (str(run),):
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                           [("proof_run", str(run)), ("proof", proof)])
        db.execute("COMMIT")
    finally:
        db.close()


class FolderFiles:
    """The file-by-file entries of one folder (:meth:`FileCache.files_of`) for a walk that
    meets its files in order: read :data:`FILES_AHEAD` a query (the ``dir`` index holds each
    path, so the query seeks and needs no sort), and matches marked seen as many at a time,
    where :meth:`FileCache.lookup` costs a query per file. A file met out of that order (a
    name Python sorts otherwise than its bytes) gets a point lookup; entries passed unmet
    are left unmarked, so :meth:`FileCache.finish` drops them."""

    def __init__(self, cache: FileCache, dir_rel: str) -> None:
        self._cache, self._dir = cache, _encode(dir_rel)
        self._ahead: deque[Any] = deque()
        self._read_to: bytes | None = None  # the last path read ahead
        self._done = False
        self._last: bytes | None = None  # the last path looked up in order

    def lookup(self, rel_path: str, st: os.stat_result) -> Entry | None:
        """As :meth:`FileCache.lookup` (a match is marked seen before :meth:`FileCache.leave`
        returns for the folder, or :meth:`FileCache.finish` runs). Raises
        ``sqlite3.OperationalError``; a corrupt file is moved aside (then None)."""
        key = _encode(rel_path)
        if self._last is not None and key <= self._last:
            return self._cache.lookup(rel_path, st)
        self._last = key
        row = self._find(key)
        if row is None or (row[1], row[2], row[3], row[4]) != (
                st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
            return None
        self._cache._saw(key)
        _, size, mtime_ns, ctime_ns, inode, blobs, sha256, written = row
        return Entry(size, mtime_ns, ctime_ns, inode, tuple(blobs.split(",")) if blobs else (),
                     sha256, written)

    def _find(self, key: bytes) -> Any:
        while True:
            while self._ahead and self._ahead[0][0] < key:
                self._ahead.popleft()  # not met (yet): unmarked
            if self._ahead:
                return self._ahead.popleft() if self._ahead[0][0] == key else None
            if self._done:
                return None
            rows = self._cache._files_after(self._dir, self._read_to)
            self._ahead.extend(rows)
            if rows:
                self._read_to = rows[-1][0]
            self._done = len(rows) < FILES_AHEAD
