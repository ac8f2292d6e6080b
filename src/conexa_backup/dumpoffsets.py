"""Data offsets for a custom-format dump that ``pg_dump`` wrote into a pipe.

``pg_dump -Fc`` writes the table of contents (TOC) before the data. Writing to a file, it goes
back at the end and fills in where each table's data block starts; writing into a pipe, as our
backups do, it cannot, and leaves every offset "not set". ``pg_restore -j`` must then have each
worker read through the blocks before its table's to find it: about a fifth of a restore's
time. The staging copy a restore hands to ``pg_restore`` is written by us, in order, so
:class:`OffsetFinder` notes where each block starts as the bytes pass, and :func:`apply` fills
the offsets in that copy (never in the stored backup): ``pg_restore`` then seeks, as it does in
``pg_dump``'s own file, and the patched copy is byte for byte what ``pg_dump -f`` writes.

The layout read here (``pg_backup_archiver.c`` ``ReadHead``/``ReadToc``, ``pg_backup_custom.c``),
for archive versions 1.12 (PostgreSQL 9.5) to 1.16 (PostgreSQL 17):

- an int is a sign byte then ``intSize`` bytes, little-endian; a string is an int length (-1:
  none) then the bytes; an offset is a state byte (1 not set, 2 set, 3 no data) then
  ``offSize`` bytes, little-endian;
- a data block is a type byte (1 table data, 3 large objects), the entry's dump id (an int),
  chunks (an int length, then that many bytes) and a zero-length chunk that ends it.

Why a plain search finds the blocks: table data is COPY text (or INSERT statements), which never
holds a NUL byte, and the chunk lengths are never 0 but at the end, so five zero bytes (a zero
int) followed by a block header with the next entry's id occur only where that block starts.
Large objects are binary and could hold anything, so the search stops at the first of their
blocks: the entries after it keep "not set" and ``pg_restore`` finds them as it always did.
Anything not as expected (another version, compressed data, a block not where it must be) gives
no offsets at all, and the copy is restored as it was stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"PGDMP"
VERSIONS = ((1, 12), (1, 16))  # the archive versions whose layout is read here
MAX_HEAD = 64 << 20  # a TOC larger than this (a schema of ~100,000 objects) is left unpatched
ZERO_INT = b"\x00" * 5  # intSize 4: a sign byte and four zeros
SEAM = len(ZERO_INT) + 6 - 1  # a header and its zero int cut across two feeds: all but a byte
BLK_DATA, BLK_BLOBS = 1, 3
NOT_SET, SET = 1, 2
TEXT_DATA = {"TABLE DATA"}  # whose blocks are COPY text or INSERTs: NUL-free


class NotPatchable(Exception):
    """The archive is not one whose offsets we fill in; it is restored as it was stored."""


class _Short(Exception):
    """More bytes are needed to read the TOC."""


@dataclass(frozen=True)
class Slot:
    """A TOC entry with a data block: its dump id, whether its data is text, and where its
    offset's state byte lies in the file."""

    dump_id: int
    text: bool
    field: int


@dataclass(frozen=True)
class Toc:
    """What the patch needs from an archive's header and TOC."""

    off_size: int
    data_start: int
    slots: tuple[Slot, ...]


class _Reader:
    def __init__(self, buf: bytes | bytearray) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Short
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def int(self) -> int:
        sign = self.byte()
        value = int.from_bytes(self.take(4), "little")
        if sign not in (0, 1):
            raise NotPatchable(f"bad integer sign byte {sign} at {self.pos - 5}")
        return -value if sign else value

    def str(self) -> bytes | None:
        n = self.int()
        if n < -1:
            raise NotPatchable(f"bad string length {n} at {self.pos - 5}")
        return None if n == -1 else self.take(n)


def read_toc(buf: bytes | bytearray) -> Toc:
    """Read the header and TOC at the start of a custom-format archive.

    Raises:
        NotPatchable: not a version, format or compression this module handles.
        _Short: ``buf`` ends before the TOC does.
    """
    r = _Reader(buf)
    if r.take(5) != MAGIC:
        raise NotPatchable("not a custom-format archive")
    version = (r.byte(), r.byte())
    r.byte()  # revision
    int_size, off_size, fmt = r.byte(), r.byte(), r.byte()
    if not VERSIONS[0] <= version <= VERSIONS[1]:
        raise NotPatchable(f"archive version {version[0]}.{version[1]}")
    if int_size != 4 or not 4 <= off_size <= 8 or fmt != 1:
        raise NotPatchable(f"int size {int_size}, offset size {off_size}, format {fmt}")
    compression = r.byte() if version >= (1, 15) else r.int()
    if compression != 0:
        raise NotPatchable("compressed data")
    for _ in range(7):  # creation time
        r.int()
    for _ in range(3):  # database name, server and pg_dump versions
        r.str()
    return Toc(off_size, *_read_entries(r, version, off_size))


def _read_entries(r: _Reader, version: tuple[int, int],
                  off_size: int) -> tuple[int, tuple[Slot, ...]]:
    slots: list[Slot] = []
    count = r.int()
    if count < 0:
        raise NotPatchable(f"bad TOC entry count {count}")
    for _ in range(count):
        dump_id, had_dumper = r.int(), r.int()
        r.str(), r.str(), r.str()  # tableoid, oid, tag
        desc = r.str()
        r.int()  # section
        # defn, drop, copy, namespace, tablespace (and from 1.14 the table access method)
        for _ in range(6 if version >= (1, 14) else 5):
            r.str()
        if version >= (1, 16):
            r.int()  # relkind
        r.str()  # owner
        if r.str() not in (b"false", b"true"):  # "with oids": where we are is not an entry
            raise NotPatchable(f"entry {dump_id}: not the TOC layout of version "
                               f"{version[0]}.{version[1]}")
        while r.str() is not None:  # dependencies, ended by a null string
            pass
        field = r.pos
        state = r.byte()
        r.take(off_size)
        if state == NOT_SET:
            if dump_id <= 0 or not had_dumper:
                raise NotPatchable(f"entry {dump_id}: offset not set on an entry without data")
            slots.append(Slot(dump_id, desc in {d.encode() for d in TEXT_DATA}, field))
        elif state not in (SET, 3):
            raise NotPatchable(f"entry {dump_id}: bad offset state {state}")
    return r.pos, tuple(slots)


def _find(edge: bytes, edge_at: int, data: bytes, at: int, pattern: bytes,
          start: int) -> int | None:
    """The first offset at or after ``start`` where ``pattern`` lies, in ``edge`` (the seam,
    starting at ``edge_at``) or ``data`` (starting at ``at``); None if in neither."""
    i = edge.find(pattern, max(0, start - edge_at))
    if i >= 0 and edge_at + i < at:
        return edge_at + i
    j = data.find(pattern, max(0, start - at))
    found = [x for x in (edge_at + i if i >= 0 else None, at + j if j >= 0 else None)
             if x is not None]
    return min(found) if found else None


def _header(slot: Slot) -> bytes:
    kind = BLK_DATA if slot.text else BLK_BLOBS
    return bytes([kind, 0]) + slot.dump_id.to_bytes(4, "little")


class OffsetFinder:
    """Fed an archive's bytes in order (:meth:`feed`), finds where each data block starts.

    It never raises: an archive it cannot read is simply left without offsets
    (:meth:`offsets` returns None). Memory: the TOC, then a few bytes.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self._toc: Toc | None = None
        self._seen = 0  # bytes fed so far
        self._try_at = 0  # TOC bytes held before reading it again: doubled on each miss
        self._tail = b""  # the last bytes fed, for a header cut across two feeds
        self._found: list[int] = []
        self._next = 0  # where the next header may start
        self._done = False  # every block found, or the search stopped at a binary one
        self.failed: str | None = None

    def feed(self, data: bytes) -> None:
        """Look at the next bytes of the archive."""
        if self.failed is None and not self._done:
            try:
                self._feed(data)
            except NotPatchable as exc:
                self.failed = str(exc)
        self._seen += len(data)

    def _feed(self, data: bytes) -> None:
        if self._toc is None:
            self._head += data
            if len(self._head) < self._try_at:
                return
            try:
                self._toc = read_toc(self._head)
            except _Short:
                if len(self._head) > MAX_HEAD:
                    raise NotPatchable("table of contents too large") from None
                self._try_at = 2 * len(self._head)  # read it again when twice as long
                return
            start = self._toc.data_start
            rest, self._head = bytes(self._head[start:]), bytearray()
            self._search(rest, start)
        else:
            self._search(data, self._seen)

    def _search(self, data: bytes, at: int) -> None:
        """Find the next blocks' headers in ``data`` (which starts at offset ``at``).

        ``data`` is searched where it lies: only the few bytes around the seam with the last
        feed are joined (a header may be cut across two feeds), never the whole MiB.
        """
        toc = self._toc
        assert toc is not None
        edge_at = at - len(self._tail)
        edge = self._tail + data[:SEAM]
        while len(self._found) < len(toc.slots):
            slot = toc.slots[len(self._found)]
            if not self._found:  # the first block starts where the TOC ends
                pos = toc.data_start
                off = pos - edge_at
                if off + 6 > len(edge) and pos + 6 > at + len(data):
                    break
                got = edge[off:off + 6] if off + 6 <= len(edge) else data[pos - at:pos - at + 6]
                if got != _header(slot):
                    raise NotPatchable("the first data block is not where the TOC ends")
            else:
                hit = _find(edge, edge_at, data, at, ZERO_INT + _header(slot), self._next)
                if hit is None:
                    break
                pos = hit + len(ZERO_INT)
            self._found.append(pos)
            self._next = pos + 6
            if not slot.text:
                break  # binary from here: a search could be fooled
        if len(self._found) == len(toc.slots) or (self._found and not toc.slots[
                len(self._found) - 1].text):
            self._done = True
            return
        end = at + len(data)
        src, src_at = (data, at) if len(data) >= SEAM else (self._tail + data, edge_at)
        self._tail = src[max(0, max(self._next, end - SEAM) - src_at):]

    def offsets(self) -> list[tuple[int, int]] | None:
        """(offset field, block start) pairs to fill in (none when the archive has no data
        blocks), or None: leave the archive as it is."""
        if self._toc is None and self.failed is None:  # the stream ended before a retry
            self._try_at = 0
            self.feed(b"")
        if self.failed is not None or self._toc is None:
            return None
        slots = self._toc.slots
        if not self._done:
            return None  # a block not found in order: trust none of them
        return [(slot.field, pos) for slot, pos in zip(slots, self._found, strict=False)]

    @property
    def off_size(self) -> int:
        assert self._toc is not None
        return self._toc.off_size


def apply(path: Path, offsets: list[tuple[int, int]], off_size: int) -> Callable[[], None]:
    """Fill ``offsets`` into the archive at ``path``; return what puts its own bytes back.

    Raises:
        OSError: the file could not be written (what was written is put back first).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        before = [(field, os.pread(fd, 1 + off_size, field)) for field, _ in offsets]
    finally:
        os.close(fd)

    def write(changes: list[tuple[int, bytes]]) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for field, data in changes:
                os.pwrite(fd, data, field)
        finally:
            os.close(fd)

    def undo() -> None:
        write(before)

    try:
        write([(field, bytes([SET]) + pos.to_bytes(off_size, "little"))
               for field, pos in offsets])
    except OSError:
        undo()
        raise
    return undo
