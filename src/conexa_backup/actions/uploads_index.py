"""A packs backup's uploads index: how it is stored, and how it is read (issue 15).

The index is JSON lines, one per entry (:class:`~conexa_backup.manifest.IndexEntry`), in the
walk's order. A backup whose manifest says ``uploads.index = "chunks"`` stores it in the
target's packs, like the files: cut after each line whose CRC-32 ends in nine zero bits
(:class:`Cutter`: about every 512th line, and at :data:`MAX_CHUNK`), each piece a blob named as
the files' are, so that a piece of the index unchanged since an earlier backup is a blob the
target already holds and costs nothing to store again. Its ``uploads-index`` artifact then
lists the pieces in order (:class:`Chunk`, one JSON line each: blob id, size, SHA-256).
Cutting by content rather than by offset keeps the pieces after an added or removed line
the same: the cut points move with the lines. An older backup (``"lines"``) stores the
index itself as the artifact.

:class:`Needs` holds a read index in a temporary SQLite file: entries, and for each blob
where it belongs (entry, offset) and whether a good pack has given it yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from conexa_backup import archive, packs
from conexa_backup.errors import IntegrityError, UnsafeArchiveError
from conexa_backup.manifest import IndexEntry, shown_path
from conexa_backup.pipeline import CHUNK
from conexa_backup.scratch import scratch_name

CUT_MASK: Final = 0x1FF  # a cut after a line whose CRC-32 has these bits clear: 1 in 512
MAX_CHUNK: Final = 4 << 20  # bytes of index in one piece, at most (a cut whatever the line)
CHUNKS_FILE: Final = "uploads.index.jsonl"  # the index's name while it is rebuilt
_HEX64: Final = re.compile(r"[0-9a-f]{64}")

NAMED = 5  # files (and packs) named in a message, at most
_CACHE_KIB = 2048  # SQLite page cache of the temporary index: lookups are by index
BATCH = 500  # blob ids looked up per query (SQLite allows 32,766 parameters)

_SCHEMA = """
CREATE TABLE entries (seq INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, type TEXT NOT NULL,
    mode INTEGER, uid INTEGER, gid INTEGER, mtime_ns INTEGER, size INTEGER, target BLOB);
CREATE TABLE need (blob BLOB NOT NULL, entry INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL);
CREATE INDEX need_by_blob ON need (blob);
CREATE TABLE wanted (blob BLOB PRIMARY KEY, found INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
"""
_COLUMNS = "SELECT path, mode, uid, gid, mtime_ns, size, target FROM entries WHERE type = ?"
_IN_ORDER = f"{_COLUMNS} ORDER BY seq"
_BY_PATH = f"{_COLUMNS} ORDER BY path DESC"


def _lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of ``stream`` (read in large chunks: a decompressing reader is no file)."""
    rest = b""
    while data := stream.read(CHUNK):
        parts = (rest + data).split(b"\n")
        rest = parts.pop()
        yield from (p for p in parts if p.strip())
    if rest.strip():
        yield rest


@dataclass
class Counts:
    """What an index holds (what a restore of it must make)."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0
    symlinks: int = 0


class Needs:
    """A backup's uploads index in a temporary SQLite file: entries, and each needed blob's
    places (entry, offset, length) and whether a good pack has given it yet. One thread."""

    def __init__(self, scratch: Path, piece_size: int = packs.PIECE_SIZE) -> None:
        self.path = scratch / scratch_name(f"needs-{secrets.token_hex(4)}")
        self.piece_size = piece_size
        self.counts = Counts()
        self.chunks: list[str] = []  # the blob ids of the pieces the index was stored in
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self.path.chmod(0o600)
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "temp_store = FILE",
                       f"cache_size = -{_CACHE_KIB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Needs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loading -------------------------------------------------------------------------------

    def load(self, stream: IO[bytes]) -> Counts:
        """Read the index from ``stream`` (decompressed JSON lines) and check it.

        Raises:
            UnsafeArchiveError: an entry is absolute, holds ``..`` or NUL, lies through a
                symlink of the index, is stored twice, or the root is not a folder.
            IntegrityError: a line is not an index entry, or a file's blobs do not fit its
                size.
        """
        self._db.execute("BEGIN")
        for seq, line in enumerate(_lines(stream)):
            self._add(seq, IndexEntry.from_line(line))
        self._check_links()
        self._db.execute("COMMIT")
        return self.counts

    def load_chunks(self, chunks: list[Chunk]) -> None:
        """Want the pieces of a stored index (:func:`read_chunks`), in order, as the blobs
        of one file, :data:`CHUNKS_FILE`: rebuilt like a restored file, then read by
        :meth:`load` into another :class:`Needs`."""
        self._db.execute("BEGIN")
        self._db.execute("INSERT INTO entries (seq, path, type, size) VALUES (0, ?, 'file', ?)",
                         (CHUNKS_FILE.encode(), sum(c.size for c in chunks)))
        offset = 0
        for chunk in chunks:
            raw = bytes.fromhex(chunk.id)
            self._db.execute("INSERT INTO need VALUES (?, 0, ?, ?)", (raw, offset, chunk.size))
            self._db.execute("INSERT OR IGNORE INTO wanted (blob) VALUES (?)", (raw,))
            offset += chunk.size
        self._db.execute("COMMIT")

    def _add(self, seq: int, entry: IndexEntry) -> None:
        name = archive._clean_name(entry.path, shown_path(entry.path), "index entry")
        if name == "." and entry.type != "dir":
            raise UnsafeArchiveError("refusing index entry '.': the root is not a folder")
        raw = os.fsencode(name)
        target = None if entry.target is None else os.fsencode(entry.target)
        try:
            self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (seq, raw, entry.type, entry.mode, entry.uid, entry.gid,
                              entry.mtime_ns, entry.size, target))
        except sqlite3.IntegrityError:
            raise UnsafeArchiveError(f"refusing index entry {shown_path(name)!r}: stored "
                                     "twice") from None
        if entry.type == "file":
            self._add_file(seq, name, entry)
        elif entry.type == "symlink":
            self.counts.symlinks += 1
        elif name != ".":
            self.counts.dirs += 1

    def _add_file(self, seq: int, name: str, entry: IndexEntry) -> None:
        size, blobs = entry.size or 0, entry.blobs or ()
        if size < 0 or len(blobs) != -(-size // self.piece_size):
            raise IntegrityError(f"uploads index: {shown_path(name)}: {len(blobs)} blobs for "
                                 f"{size} bytes")
        for i, blob in enumerate(blobs):
            try:
                raw = bytes.fromhex(blob)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise IntegrityError(f"uploads index: {shown_path(name)}: not a blob id")
            offset = i * self.piece_size
            self._db.execute("INSERT INTO need VALUES (?, ?, ?, ?)",
                             (raw, seq, offset, min(self.piece_size, size - offset)))
            self._db.execute("INSERT OR IGNORE INTO wanted (blob) VALUES (?)", (raw,))
        self.counts.files += 1
        self.counts.bytes += size

    def _check_links(self) -> None:
        """Refuse an entry whose path passes through a symlink of the index (writing it
        would write through the link once links are made)."""
        links = self._db.execute("SELECT path FROM entries WHERE type = 'symlink'")
        for (link,) in links:
            below = self._db.execute(
                "SELECT path FROM entries WHERE path > ? AND path < ? LIMIT 1",
                (link + b"/", link + b"0")).fetchone()
            if below is not None:
                raise UnsafeArchiveError(
                    f"refusing index entry {shown_path(os.fsdecode(below[0]))!r}: its path "
                    "passes through a symlink of the index")

    # -- blobs ---------------------------------------------------------------------------------

    def _rows_for(self, query: str, blobs: list[str]) -> Iterator[Any]:
        """The rows of ``query`` (its ``{ids}`` a list of parameters) for ``blobs``, a
        query per :data:`BATCH` ids rather than one per blob. Only ``?`` marks are put
        into the text: the ids are parameters."""
        for i in range(0, len(blobs), BATCH):
            chunk = blobs[i:i + BATCH]
            yield from self._db.execute(query.format(ids=",".join("?" * len(chunk))),
                                        [bytes.fromhex(b) for b in chunk])

    def wanted_among(self, blobs: list[str]) -> set[str]:
        """Those of ``blobs`` (a pack's) that are needed and not yet found."""
        return {raw.hex() for (raw,) in self._rows_for(
            "SELECT blob FROM wanted WHERE found = 0 AND blob IN ({ids})", blobs)}

    def places_among(self, blobs: list[str]) -> dict[str, list[tuple[bytes, int, int]]]:
        """Blob -> (path, offset, length) of every place it belongs, for ``blobs``."""
        found: dict[str, list[tuple[bytes, int, int]]] = {}
        for raw, path, offset, length in self._rows_for(
                "SELECT n.blob, e.path, n.offset, n.length FROM need n JOIN entries e "
                "ON e.seq = n.entry WHERE n.blob IN ({ids})", blobs):
            found.setdefault(raw.hex(), []).append((path, offset, length))
        return found

    def want(self, raw_ids: Iterable[bytes]) -> None:
        """Want these blobs (raw 32-byte ids) without knowing their files (a backup's refs)."""
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR IGNORE INTO wanted (blob) VALUES (?)",
                             ((raw,) for raw in raw_ids))
        self._db.execute("COMMIT")

    def found(self, blobs: Iterable[str]) -> None:
        """Mark ``blobs`` given by a good pack. One transaction: in autocommit each row was
        one, and a write of its page (a tenth of a restore's time, with thousands of
        blobs)."""
        self._db.execute("BEGIN")
        self._db.executemany("UPDATE wanted SET found = 1 WHERE blob = ?",
                             ((bytes.fromhex(b),) for b in blobs))
        self._db.execute("COMMIT")

    def missing(self) -> tuple[int, int, list[str], list[str]]:
        """(blobs missing, files affected, the first files' names, the first blobs)."""
        blobs = self._db.execute("SELECT count(*) FROM wanted WHERE found = 0").fetchone()[0]
        if not blobs:
            return 0, 0, [], []
        files = self._db.execute(
            "SELECT count(DISTINCT n.entry) FROM need n JOIN wanted w ON w.blob = n.blob "
            "WHERE w.found = 0").fetchone()[0]
        first = self._db.execute(
            "SELECT DISTINCT e.path FROM need n JOIN wanted w ON w.blob = n.blob JOIN entries "
            "e ON e.seq = n.entry WHERE w.found = 0 ORDER BY e.seq LIMIT ?", (NAMED,))
        ids = self._db.execute("SELECT blob FROM wanted WHERE found = 0 LIMIT 20")
        return (blobs, files, [shown_path(os.fsdecode(p)) for (p,) in first],
                [b.hex() for (b,) in ids])

    def entries(self, kind: str, *, deepest_first: bool = False) -> Iterator[tuple[Any, ...]]:
        """(path, mode, uid, gid, mtime_ns, size, target) of every entry of ``kind``, in index
        order (or by path, descending: what a folder holds before the folder)."""
        return iter(self._db.execute(_BY_PATH if deepest_first else _IN_ORDER, (kind,)))


# -- the index in pieces ------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """One piece of a stored index: its blob id, size and plain SHA-256 (what the by-hand
    script checks: it holds no dedup key)."""

    id: str
    size: int
    sha256: str

    def to_line(self) -> bytes:
        return (f'{{"chunk": "{self.id}", "size": {self.size}, '
                f'"sha256": "{self.sha256}"}}\n').encode()


class Cutter:
    """Cuts the index into pieces as the walk gives its lines: after a line whose CRC-32 has
    the bits of :data:`CUT_MASK` clear, or once a piece holds :data:`MAX_CHUNK` bytes. Each
    finished piece goes to ``on_piece`` with its bytes (ids keyed with ``key``, as the files'
    are); only the piece being filled is held."""

    def __init__(self, key: bytes | None,
                 on_piece: Callable[[Chunk, bytes], object]) -> None:
        self._key, self._on_piece = key, on_piece
        self._lines: list[bytes] = []
        self._size = 0
        self.chunks: list[Chunk] = []  # the pieces handed on, in order

    def feed(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self._lines.append(line)
            self._size += len(line)
            if zlib.crc32(line) & CUT_MASK == 0 or self._size >= MAX_CHUNK:
                self._emit()

    def finish(self) -> list[Chunk]:
        """Hand on the last piece; return every piece, in order."""
        if self._lines:
            self._emit()
        return self.chunks

    def _emit(self) -> None:
        data = b"".join(self._lines)
        self._lines, self._size = [], 0
        digest = hashlib.sha256(data).hexdigest()
        blob = digest if self._key is None else packs.blob_id(data, self._key)
        chunk = Chunk(blob, len(data), digest)
        self.chunks.append(chunk)
        self._on_piece(chunk, data)


def read_chunks(stream: IO[bytes]) -> list[Chunk]:
    """The pieces a stored index lists (its artifact, decompressed), in order.

    Raises:
        IntegrityError: a line is not a piece, or there is none.
    """
    chunks = []
    for line in _lines(stream):
        try:
            raw = json.loads(line)
            chunk = Chunk(str(raw["chunk"]), int(raw["size"]), str(raw["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"uploads index: unreadable piece ({exc})") from None
        if not (_HEX64.fullmatch(chunk.id) and _HEX64.fullmatch(chunk.sha256)) \
                or not 0 < chunk.size <= packs.MAX_CONTENT:
            raise IntegrityError(f"uploads index: malformed piece {line[:120]!r}")
        chunks.append(chunk)
    if not chunks:  # an index holds its root at least
        raise IntegrityError("uploads index: the list of its pieces is empty")
    return chunks


class PieceCache:
    """The index pieces one run has read, by target, in an anonymous temporary file: ``verify
    --all`` reads the indexes of many backups, which share most of their pieces, and a pack
    it has checked once must not be read again for them."""

    def __init__(self) -> None:
        self._file: IO[bytes] | None = None
        self._where: dict[tuple[str, str], tuple[int, int]] = {}  # -> (offset, size)

    def write(self, target: str, chunks: list[Chunk], offsets: list[int],
              path: Path) -> list[str]:
        """Write the pieces of ``chunks`` read from ``target`` before into ``path`` at their
        ``offsets``; return their ids."""
        done: list[str] = []
        if self._file is None:
            return done
        with path.open("r+b") as out:
            for chunk, offset in zip(chunks, offsets, strict=False):
                place = self._where.get((target, chunk.id))
                if place is not None and place[1] == chunk.size:  # (a list may lie: read it)
                    out.seek(offset)
                    self._file.seek(place[0])
                    out.write(self._file.read(place[1]))
                    done.append(chunk.id)
        return done

    def add(self, target: str, chunks: list[Chunk], offsets: list[int], path: Path,
            scratch: Path) -> None:
        """Keep the pieces of ``chunks`` (read from ``target``, joined in ``path``)."""
        if self._file is None:
            # Anonymous (unlinked at once): it lasts as long as the run, and leaves nothing.
            self._file = tempfile.TemporaryFile(dir=scratch, prefix="pieces-")  # noqa: SIM115
        with path.open("rb") as joined:
            for chunk, offset in zip(chunks, offsets, strict=False):
                if (target, chunk.id) not in self._where:
                    joined.seek(offset)
                    end = self._file.seek(0, os.SEEK_END)
                    self._file.write(joined.read(chunk.size))
                    self._where[(target, chunk.id)] = (end, chunk.size)
