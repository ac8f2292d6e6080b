"""Folder blocks: the file cache's record of a whole folder in one row (issue 15).

A backup of an unchanged tree must cost little more than its walk. Asking the cache about
each file, or even each folder, took most of such a backup's time (measured: about 20 µs a
query), so the file cache (:mod:`filecache`) keeps one row per folder, its **block**: for
each file in it, the fields of :data:`FIELDS` (its name, its lstat, its place on the rehash
wheel, what it hashed to) joined by NUL (no name, number or id holds one) so that one split
decodes the folder, then the files' lines of the uploads index, as bytes (an unchanged file's
line goes to the new index as it is: never decoded, never encoded again).

Rows are keyed by :func:`order_key`, which sorts folders in the order the walk
(``archive.walk``: names sorted, a folder's contents right after it) enters them, so a run
reads the blocks as one stream, a few hundred rows a query (:class:`BlockStream`), and an
unchanged file then costs its lstat, a string compare and its stored line. A row the
stream passes unasked is a folder gone; an unchanged folder's row is not written at all.

Each row says which run last wrote it (``written``). Once a backup is committed, the cache
records its run and a proof that its targets hold every blob it names (``BlobIndex.losses``):
every row then in the cache took part in that run, so the proof covers each row written by
that run or before, and none written by a later run (one that failed, perhaps).

A folder too large to hold in memory is cached file by file instead (the ``files`` table);
its row is then a marker (``per_file``) without records.
"""

from __future__ import annotations

import os
import sqlite3
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

FIELDS: Final = 5  # name, stat key, wheel place, sha256, blob ids (comma-joined)
AHEAD: Final = 256  # rows read ahead in one query
INLINE_MAX: Final = 1 << 16  # larger blocks are read only when the walk reaches them
SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS folders (
    key BLOB PRIMARY KEY,
    written INTEGER NOT NULL,
    per_file INTEGER NOT NULL,
    recs BLOB NOT NULL
) WITHOUT ROWID;
"""


def order_key(dir_rel: str) -> bytes:
    """The row key of folder ``dir_rel`` (``"."``: the root): its path with each ``/`` made
    a NUL, so that byte order is the walk's order (a folder before its contents, and
    ``a/b`` before ``a-c`` as ``a`` comes before ``a-c``). Encoded UTF-8 with surrogates
    passed (a name that is not UTF-8 holds them: ``os.fsdecode``): byte order is then code
    point order, which is how the walk sorts names (``surrogateescape`` would put such a
    byte after every multi-byte character)."""
    if dir_rel == ".":
        return b""
    return dir_rel.replace("/", "\0").encode("utf-8", "surrogatepass")


def folder_of(key: bytes) -> str:
    """The folder whose :func:`order_key` is ``key``."""
    return key.decode("utf-8", "surrogatepass").replace("\0", "/") if key else "."


# A block: CRC-32 of the rest (4 bytes: damage SQLite cannot see is found; a third of the
# time of an 8-byte BLAKE2b, measured), the length of the fields (4 bytes), the fields, the
# index lines (ASCII JSON, each ending in a newline and holding no other: json escapes it).
_CHECK = 4
_LENGTH = 4


def stat_text(st: os.stat_result) -> str:
    """What a block compares of a file's lstat: size, mtime_ns, ctime_ns, inode, mode, uid,
    gid (everything its index line says of it, and what shows a change)."""
    return (f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino} {st.st_mode} "
            f"{st.st_uid} {st.st_gid}")


class Block:
    """A folder's cached files as the run ``written`` left them.

    Raises (constructor) ValueError: ``raw`` is not what :meth:`Folder.encoded` writes (its
    checksum does not match: a flipped bit in the file would otherwise put a wrong blob id,
    never asked about, in a backup's index).
    """

    __slots__ = ("fields", "lines", "per_file", "written")

    def __init__(self, raw: bytes, written: int, per_file: bool) -> None:
        self.fields: list[str] = []
        self.lines: list[bytes] = []
        if raw:
            body = raw[_CHECK:]
            if zlib.crc32(body) != int.from_bytes(raw[:_CHECK], "big"):
                raise ValueError("a folder block whose checksum does not match")
            end = _LENGTH + int.from_bytes(body[:_LENGTH], "big")
            self.fields = body[_LENGTH:end].decode("utf-8", "surrogateescape").split("\0")
            self.lines = body[end:].splitlines(keepends=True)
        if len(self.fields) % FIELDS or len(self.lines) * FIELDS != len(self.fields):
            raise ValueError("a folder block of the wrong shape")
        self.written, self.per_file = written, per_file


class Folder:
    """One folder as a run goes through it: its cached files not yet met, and what the run
    keeps of it (written back only when it differs: :attr:`dirty`)."""

    def __init__(self, rel: str, block: Block | None) -> None:
        self.rel = rel
        self.written = block.written if block is not None else None
        self.per_file = block.per_file if block is not None else False
        self._fields = block.fields if block is not None else []
        self._lines = block.lines if block is not None else []
        self._left = {self._fields[i]: i for i in range(0, len(self._fields), FIELDS)}
        self._out: list[str] = []
        self._out_lines: list[bytes] = []
        self._changed = False
        self.count = 0  # files kept

    def take(self, name: str, stat: str) -> int | None:
        """The cached record of file ``name`` (no longer left to meet) if its
        :func:`stat_text` is ``stat``; else None (the file must be read)."""
        at = self._left.pop(name, None)
        if at is None or self._fields[at + 1] != stat:
            return None
        return at

    def place(self, at: int) -> int:
        return int(self._fields[at + 2])

    def sha256(self, at: int) -> str:
        return self._fields[at + 3]

    def blobs(self, at: int) -> list[str]:
        ids = self._fields[at + 4]
        return ids.split(",") if ids else []

    def joined_blobs(self, at: int) -> str:
        """The blob ids of record ``at``, comma-joined ("" for none)."""
        return self._fields[at + 4]

    def line(self, at: int) -> bytes:
        return self._lines[at // FIELDS]

    def left_blobs(self) -> set[str]:
        """The blob ids of the cached files not met yet."""
        return {b for at in self._left.values() for b in self.blobs(at)}

    def keep(self, at: int) -> None:
        """The file of record ``at`` is unchanged: keep its record."""
        self._out.extend(self._fields[at:at + FIELDS])
        self._out_lines.append(self._lines[at // FIELDS])
        self.count += 1

    def add(self, name: str, stat: str, place: int, sha256: str, blobs: list[str],
            line: bytes, was: int | None = None) -> None:
        """Record file ``name`` as read now (``was``: its record, if it had one whose stat
        matched: a re-read that found it the same changes nothing)."""
        rec = [name, stat, str(place), sha256, ",".join(blobs)]
        if was is None or rec != self._fields[was:was + FIELDS] \
                or line != self._lines[was // FIELDS]:
            self._changed = True
        self._out.extend(rec)
        self._out_lines.append(line)
        self.count += 1

    @property
    def dirty(self) -> bool:
        """Whether its block must be written again: a file read and found other, or a
        cached file not met (deleted, or skipped this time)."""
        return self._changed or bool(self._left)

    def encoded(self) -> bytes:
        fields = "\0".join(self._out).encode("utf-8", "surrogateescape")
        body = b"".join((len(fields).to_bytes(_LENGTH, "big"), fields, *self._out_lines))
        return zlib.crc32(body).to_bytes(_CHECK, "big") + body

    def records(self) -> Iterator[tuple[str, list[int], str, str, bool]]:
        """(path, [size, mtime_ns, ctime_ns, inode], sha256, blob ids, met) of each file
        kept (met) and each cached file not met yet."""
        prefix = "" if self.rel == "." else f"{self.rel}/"
        places = [(self._out, at, True) for at in range(0, len(self._out), FIELDS)] \
            + [(self._fields, at, False) for at in self._left.values()]
        for fields, at, met in places:
            numbers = [int(n) for n in fields[at + 1].split()[:4]]
            yield prefix + fields[at], numbers, fields[at + 3], fields[at + 4], met

    def spilled(self) -> None:
        """Its records went to the cache file by file: hold none any more."""
        self.per_file = True
        self._out, self._fields, self._left = [], [], {}
        self._out_lines, self._lines = [], []


Row = tuple[bytes, "bytes | None", int, int]
_AHEAD_SQL = ("SELECT key, CASE WHEN length(recs) <= ? THEN recs END, written, per_file "
              "FROM folders WHERE key {} ? ORDER BY key LIMIT ?")
_FROM, _AFTER = _AHEAD_SQL.format(">="), _AHEAD_SQL.format(">")


class BlockStream:
    """The blocks of the folders a walk enters, read ahead in :func:`order_key` order
    (:data:`AHEAD` rows a query). Asked in the walk's order, it answers from what it read;
    a folder asked out of that order (a name sorted otherwise by Python than by bytes) gets
    a query of its own. Rows it passes without being asked are folders gone (:attr:`gone`;
    and every row after the last asked, :attr:`asked`), for the cache to delete.
    """

    def __init__(self, conn: Callable[[], sqlite3.Connection]) -> None:
        self._conn = conn
        self._ahead: deque[Row] = deque()
        self._read_to: bytes | None = None  # the last key read ahead
        self._done = False
        self.asked: bytes | None = None  # the last key asked in order
        self.gone: list[bytes] = []  # rows passed unasked, not deleted yet (AHEAD at most)

    def stop(self) -> None:
        """Read nothing more ahead (the cache was rebuilt empty)."""
        self._ahead.clear()
        self._done = True

    def get(self, dir_rel: str) -> Block | None:
        """The block of folder ``dir_rel``, or None. Raises ``sqlite3.Error``, ValueError
        (a block that cannot be decoded)."""
        key = order_key(dir_rel)
        if self.asked is not None and key <= self.asked:
            if key in self.gone:
                self.gone.remove(key)
            return self._one(key)
        self.asked = key
        while True:
            while self._ahead and self._ahead[0][0] < key:
                self.gone.append(self._ahead.popleft()[0])
                if len(self.gone) >= AHEAD:  # a renamed tree of many folders: memory flat
                    self.drop_gone()
            if self._ahead:
                if self._ahead[0][0] != key:
                    return None
                _, raw, written, per_file = self._ahead.popleft()
                if raw is None:  # too large to read ahead
                    return self._one(key)
                return Block(raw, written, bool(per_file))
            if self._done:
                return None
            self._read_ahead()

    def drop_gone(self) -> None:
        """Delete the rows passed unasked (folders gone)."""
        gone, self.gone = self.gone, []
        self._conn().executemany("DELETE FROM folders WHERE key = ?", ((k,) for k in gone))

    def _read_ahead(self) -> None:
        # >= x'' the first time (the root's key is empty); a range, so each query seeks.
        sql = _AFTER if self._read_to is not None else _FROM
        rows = self._conn().execute(sql, (INLINE_MAX, self._read_to or b"", AHEAD)).fetchall()
        self._ahead.extend(rows)
        if rows:
            self._read_to = rows[-1][0]
        self._done = len(rows) < AHEAD

    def _one(self, key: bytes) -> Block | None:
        row = self._conn().execute("SELECT recs, written, per_file FROM folders WHERE key = ?",
                                   (key,)).fetchone()
        return None if row is None else Block(row[0], row[1], bool(row[2]))
