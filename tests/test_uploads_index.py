"""The uploads index stored in pieces (issue 15): where it is cut, and what a reader accepts."""

from __future__ import annotations

import hashlib
import io
import json
import zlib

import pytest

from conexa_backup import packs
from conexa_backup.actions.uploads_index import (
    CUT_MASK,
    MAX_CHUNK,
    Chunk,
    Cutter,
    read_chunks,
)
from conexa_backup.errors import IntegrityError


def _index(n: int, *, extra: dict[int, bytes] | None = None, skip: frozenset[int] = frozenset()
           ) -> bytes:
    """An index of ``n`` file lines (as a backup writes them), ``extra`` lines inserted
    before the given positions, the lines at ``skip`` left out."""
    out = []
    for i in range(n):
        if extra and i in extra:
            out.append(extra[i])
        if i not in skip:
            out.append(json.dumps({"path": f"2026/{i // 100:03d}/file-{i:06d}.pdf",
                                   "type": "file", "size": i, "sha256": f"{i:064x}"}
                                  ).encode() + b"\n")
    return b"".join(out)


def _pieces(data: bytes, key: bytes | None = None) -> list[tuple[Chunk, bytes]]:
    """The pieces :class:`Cutter` hands on for the index ``data``, fed in batches of lines
    as the walk feeds it."""
    handed: list[tuple[Chunk, bytes]] = []
    cutter = Cutter(key, lambda chunk, piece: handed.append((chunk, piece)))
    lines = data.splitlines(keepends=True)
    for i in range(0, len(lines), 4096):
        cutter.feed(lines[i:i + 4096])
    assert cutter.finish() == [chunk for chunk, _ in handed]
    return handed


def test_pieces_join_to_the_index_and_are_named_as_blobs() -> None:
    data = _index(20_000)
    pieces = _pieces(data)
    assert b"".join(d for _, d in pieces) == data
    assert 10 < len(pieces) < 200  # about one cut in 512 lines
    for chunk, piece in pieces:
        assert piece.endswith(b"\n")  # cut at line ends only
        assert chunk.id == chunk.sha256 == hashlib.sha256(piece).hexdigest()
        assert chunk.size == len(piece)
    key = bytes(range(32))
    keyed = _pieces(data, key)
    assert [c.sha256 for c, _ in keyed] == [c.sha256 for c, _ in pieces]
    assert all(c.id == packs.blob_id(d, key) != c.sha256 for c, d in keyed)


def test_a_line_added_or_removed_changes_only_the_pieces_around_it() -> None:
    """Cut by content: after an insertion or a deletion the cuts fall where they did."""
    before = {c.id for c, _ in _pieces(_index(20_000))}
    grown = {c.id for c, _ in _pieces(_index(20_000, extra={7_000: b'{"path": "new"}\n'}))}
    shrunk = {c.id for c, _ in _pieces(_index(20_000, skip=frozenset({13_000})))}
    for after in (grown, shrunk):
        assert len(after - before) <= 2 and len(before - after) <= 2
        assert len(after & before) >= len(before) - 2


def test_a_piece_is_cut_at_the_size_limit_whatever_its_lines() -> None:
    line = b'{"path": "' + b"x" * 1000 + b'"}\n'
    assert zlib.crc32(line) & CUT_MASK  # a line that never cuts by content
    count = 3 * MAX_CHUNK // len(line)
    pieces = _pieces(line * count)
    per_piece = -(-MAX_CHUNK // len(line))  # lines until a piece holds MAX_CHUNK bytes
    assert [len(d) for _, d in pieces] == \
        [per_piece * len(line)] * (count // per_piece) + [count % per_piece * len(line)]


def test_the_list_of_pieces_reads_back_and_malformed_lines_are_refused() -> None:
    pieces = [c for c, _ in _pieces(_index(3_000))]
    listing = b"".join(c.to_line() for c in pieces)
    assert read_chunks(io.BytesIO(listing)) == pieces
    good = json.loads(pieces[0].to_line())
    for bad in ({**good, "chunk": "zz"}, {**good, "size": 0}, {**good, "sha256": "a" * 63},
                {"chunk": good["chunk"]}, [1, 2]):
        with pytest.raises(IntegrityError, match="uploads index"):
            read_chunks(io.BytesIO(json.dumps(bad).encode() + b"\n"))
    for text in (b"not json\n", b"", b"\n"):
        with pytest.raises(IntegrityError, match="uploads index"):
            read_chunks(io.BytesIO(text))
