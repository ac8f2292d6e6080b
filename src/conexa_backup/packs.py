"""Packs: uploads stored as content-addressed blobs, many to a pack (issue 15; docs/packs.md).

A blob is a file's content, or one :data:`PIECE_SIZE` piece of a larger file, named by its
SHA-256 (or its HMAC-SHA-256 under a ``dedup_key`` when encryption is on, so ids reveal
nothing). Blobs are written into packs of about :data:`PACK_SIZE`:

- decompressed pack = the blobs' bytes, back to back; then a JSON index
  (``{"format": 1, "ids": "sha256" | "hmac-sha256", "key_id": ..., "blobs": [[id, offset,
  length], ...]}``); then a 16-byte trailer: the index's length (8 bytes, little-endian) and
  :data:`MAGIC`;
- stored pack = that, through the artifacts' own stages: zstd (:class:`pipeline.Compressor`),
  then age when there are recipients (:class:`crypto.Encryptor`);
- a pack's name is the SHA-256 of its stored bytes; its key is ``packs/<2 hex>/<name>``.

Every pack carries its own index, so a target's index of blobs can be rebuilt from its packs
alone. Memory stays bounded: a pack is streamed to a scratch file as it is written and read
back through one, never held in RAM; only one blob (at most a piece) is.
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import hmac
import json
import mmap
import os
import re
import secrets
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple

from conexa_backup import signals
from conexa_backup.config import CompressionConfig
from conexa_backup.crypto import Encryptor, decrypt_to
from conexa_backup.errors import IntegrityError, UnusableCopyError
from conexa_backup.pipeline import (
    CHUNK,
    Compressor,
    HashingReader,
    HashingSink,
    decompressing_reader,
)
from conexa_backup.scratch import scratch_name
from conexa_backup.storage.base import check_key

MiB = 1 << 20
# Files above this are split into fixed pieces, each a blob. Half a pack: large files fill
# packs two pieces at a time, and backup and restore hold one piece in RAM at most.
PIECE_SIZE = 16 * MiB
PACK_SIZE = 32 * MiB  # content of a pack: a pack is closed before a blob would cross it
# Many tiny blobs would make one pack's index (parsed in RAM on read) large: close sooner.
MAX_BLOBS = 10_000
# What a reader accepts: anything larger was not written by us (a decompression bomb).
MAX_CONTENT = 4 * PACK_SIZE
MAGIC = b"CXBPACK1"
FORMAT = 1
_TRAILER = struct.Struct("<Q8s")
AGE_MAGIC = b"age-encryption.org/v1\n"
PACKS_PREFIX = "packs/"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID_INFO = b"conexa-backup dedup key id"


def blob_id(data: bytes | memoryview, key: bytes | None = None) -> str:
    """A blob's id: hex SHA-256 of ``data``, or hex HMAC-SHA-256 of it under ``key``."""
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def key_id(key: bytes) -> str:
    """A short name for a dedup key, recorded in packs so that a reader holding another key
    says so instead of calling every blob damaged (an HMAC of a fixed text: reveals nothing)."""
    return hmac.new(key, _KEY_ID_INFO, hashlib.sha256).hexdigest()[:16]


def pack_key(name: str) -> str:
    """The storage key of pack ``name``: ``packs/<first 2 hex>/<name>``.

    Raises:
        ValueError: ``name`` is not a 64-hex pack name.
    """
    if not _HEX64.match(name):
        raise ValueError(f"not a pack name: {name!r}")
    return check_key(f"{PACKS_PREFIX}{name[:2]}/{name}")


def pack_name(key: str) -> str | None:
    """The pack name a storage key holds, or None when it is not a pack's key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] + "/" == PACKS_PREFIX and _HEX64.match(parts[2]) \
            and parts[1] == parts[2][:2]:
        return parts[2]
    return None


# -- blobs of a file ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FileBlobs:
    """A file's content as blobs: its size, SHA-256 and piece ids in order (none if empty)."""

    size: int
    sha256: str
    blobs: list[str]


def _read_piece(src: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes; fewer only at the end (a short read is not the end)."""
    data = src.read(size)
    if not data or len(data) == size:
        return data
    parts, got = [data], len(data)  # joined once: a pipe's 64 KiB reads stay linear
    while got < size and (more := src.read(size - got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def file_blobs(src: str | os.PathLike[str] | IO[bytes], key: bytes | None = None, *,
               piece_size: int = PIECE_SIZE,
               on_piece: Callable[[str, bytes], object] | None = None) -> FileBlobs:
    """Read a file (a path, or an open binary stream read to its end) in pieces of
    ``piece_size``; call ``on_piece(id, data)`` for each (e.g. :meth:`PackWriter.add`).

    Holds one piece in memory at a time. Raises OSError (and what ``on_piece`` raises).
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as fh:
            return file_blobs(fh, key, piece_size=piece_size, on_piece=on_piece)
    whole = hashlib.sha256()
    size, ids = 0, []
    while piece := _read_piece(src, piece_size):
        if size == 0 and key is None:
            # The first piece's id is the whole file's hash so far: one pass, not two (most
            # files are one piece).
            whole = hashlib.sha256(piece)
            ids.append(whole.hexdigest())
        else:
            whole.update(piece)
            ids.append(blob_id(piece, key))
        size += len(piece)
        if on_piece is not None:
            on_piece(ids[-1], piece)
    return FileBlobs(size, whole.hexdigest(), ids)


# -- writing ------------------------------------------------------------------------------------

class BlobRef(NamedTuple):
    """Where a blob is inside a decompressed pack."""

    id: str
    offset: int
    length: int


@dataclass(frozen=True)
class StoredPack:
    """A closed pack: its stored bytes are in ``path`` (a scratch file) until ``on_pack``
    returns; ``size`` is theirs, ``content_size`` the blobs' own."""

    name: str
    path: Path
    size: int
    content_size: int
    blobs: list[BlobRef]

    @property
    def key(self) -> str:
        return pack_key(self.name)


def _index_bytes(blobs: Sequence[BlobRef], key: bytes | None) -> bytes:
    index: dict[str, Any] = {"format": FORMAT, "ids": "sha256" if key is None else "hmac-sha256",
                             "blobs": [list(b) for b in blobs]}
    if key is not None:
        index["key_id"] = key_id(key)
    return json.dumps(index, separators=(",", ":")).encode()


@dataclass
class _Open:
    """A pack being written: blobs -> zstd -> (age) -> SHA-256 -> a scratch file."""

    path: Path
    file: BinaryIO
    hashing: HashingSink
    compressor: Compressor
    encryptor: Encryptor | None
    blobs: list[BlobRef] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    offset: int = 0

    def write(self, data: bytes) -> None:
        self.compressor.write(data)
        self.offset += len(data)

    def finish(self) -> None:
        self.compressor.finish()
        if self.encryptor is not None:
            self.encryptor.finish()
        self.file.close()

    def abort(self) -> None:
        """Stop and remove everything (never raises)."""
        if self.encryptor is not None:
            self.encryptor.abort()
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


class PackWriter:
    """Gathers blobs into packs of about ``pack_size`` and hands each closed one to
    ``on_pack`` (which uploads it); its scratch file is removed when ``on_pack`` returns.

    Use as a context manager: leaving normally closes the last pack; leaving by an exception
    discards it. Memory: the blob being added, and zstd's and age's own buffers.
    """

    def __init__(self, scratch: Path, on_pack: Callable[[StoredPack], object], *,
                 key: bytes | None = None, recipients: Sequence[Any] = (),
                 compression: CompressionConfig | None = None, pack_size: int = PACK_SIZE,
                 known: Callable[[str], bool] | None = None) -> None:
        """``scratch``: a private folder (``state_dir/staging``); ``recipients``: parsed age
        recipients (:func:`crypto.parse_recipients`); ``known(id)``: whether a blob is
        already stored (the caller's index), then :meth:`add` skips it. The writer itself
        remembers only the open pack's ids (memory flat in the number of files): for a blob
        to be stored once per run, ``on_pack`` must add each closed pack's blobs to what
        ``known`` consults."""
        self._scratch, self._on_pack, self._key = scratch, on_pack, key
        self._recipients = list(recipients)
        given = compression or CompressionConfig()
        # Packs are always zstd (the format says so); level and threads follow the config.
        self._compression = CompressionConfig(algorithm="zstd", level=given.level,
                                              threads=given.threads)
        self._pack_size, self._known = pack_size, known
        self._open: _Open | None = None
        self.packs: list[str] = []  # names of the packs closed so far

    def add(self, blob: str, data: bytes) -> bool:
        """Add blob ``blob`` (its id, from :func:`blob_id` with this writer's key) unless it
        is in the open pack already or ``known``; return whether it was added.

        Raises:
            ValueError: ``blob`` is not an id. OSError, ConexaError: writing the pack failed.
        """
        if not _HEX64.match(blob):
            raise ValueError(f"not a blob id: {blob!r}")
        if (self._open is not None and blob in self._open.ids) or \
                (self._known is not None and self._known(blob)):
            return False
        if self._open is not None and (self._open.offset + len(data) > self._pack_size
                                       or len(self._open.blobs) >= MAX_BLOBS):
            self.flush()
        pack = self._open or self._start()
        offset = pack.offset
        try:
            pack.write(data)
        except BaseException:  # its bytes may be half in: the pack is not to be trusted
            self.abort()
            raise
        # Recorded once written: an index never names a blob whose bytes are not there.
        pack.blobs.append(BlobRef(blob, offset, len(data)))
        pack.ids.add(blob)
        return True

    def _start(self) -> _Open:
        with signals.held():  # made whole, or not at all, before a signal is raised
            return self._started()

    def _started(self) -> _Open:
        path = self._scratch / scratch_name(f"pack-{secrets.token_hex(4)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        file = os.fdopen(fd, "wb")
        hashing = HashingSink(file)
        encryptor: Encryptor | None = None
        try:
            encryptor = Encryptor(self._recipients, hashing) if self._recipients else None
            compressor = Compressor(self._compression, encryptor or hashing)
        except BaseException:
            if encryptor is not None:
                encryptor.abort()
            file.close()
            path.unlink(missing_ok=True)
            raise
        self._open = _Open(path, file, hashing, compressor, encryptor)
        return self._open

    def flush(self) -> StoredPack | None:
        """Close the open pack (if any): write its index and trailer, name it, hand it to
        ``on_pack``, remove its scratch file. Returns it."""
        pack, self._open = self._open, None
        if pack is None:
            return None
        try:
            content_size = pack.offset
            index = _index_bytes(pack.blobs, self._key)
            pack.write(index)
            pack.write(_TRAILER.pack(len(index), MAGIC))
            pack.finish()
            stored = StoredPack(pack.hashing.hexdigest(), pack.path, pack.hashing.size,
                                content_size, pack.blobs)
            self._on_pack(stored)
            self.packs.append(stored.name)
            return stored
        finally:
            pack.abort()  # only removes the file once all went well

    def abort(self) -> None:
        """Discard the open pack (never raises)."""
        pack, self._open = self._open, None
        if pack is not None:
            pack.abort()

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.flush()
        else:
            self.abort()


# -- reading ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackIndex:
    """What a pack holds, read from the pack itself."""

    name: str
    ids: str  # "sha256" or "hmac-sha256"
    key_id: str | None
    blobs: list[BlobRef]


class _Prefixed:
    """A readable: ``head``, then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: HashingReader) -> None:
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data = self._head if n < 0 or n >= len(self._head) else self._head[:n]
            self._head = self._head[len(data):]
            return data
        return self._raw.read(n)

    def readable(self) -> bool:
        return True


def _decompress(src: IO[bytes], content: IO[bytes]) -> None:
    """zstd-decompress ``src`` into ``content``, refusing more than :data:`MAX_CONTENT`."""
    plain = decompressing_reader(src, "zstd")  # type: ignore[arg-type]
    total = 0
    while data := plain.read(CHUNK):
        total += len(data)
        if total > MAX_CONTENT:
            raise IntegrityError(f"decompresses to more than {MAX_CONTENT} bytes")
        content.write(data)


def _unpack(name: str, stored: IO[bytes], content: IO[bytes], scratch: Path,
            identities: Sequence[Any] | None) -> bool:
    """Check that ``stored`` hashes to ``name`` and write its decompressed bytes to
    ``content``; return whether it was encrypted. Encrypted packs (age) are decrypted to a
    private temporary file first."""
    reader = HashingReader(stored)  # type: ignore[arg-type]
    head = _read_piece(reader, len(AGE_MAGIC))  # type: ignore[arg-type]

    def named() -> None:
        reader.drain()
        if reader.hexdigest() != name:
            raise IntegrityError(f"pack {name}: stored bytes do not match its name "
                                 f"(SHA-256 {reader.hexdigest()}): the pack is damaged")

    if head != AGE_MAGIC:
        try:
            _decompress(_Prefixed(head, reader), content)  # type: ignore[arg-type]
        except IntegrityError as exc:
            named()
            raise IntegrityError(f"pack {name}: {exc}") from None
        named()
        return False
    if identities is None:
        named()
        raise UnusableCopyError(f"pack {name} is encrypted: an age identity is needed")
    with tempfile.TemporaryFile(dir=scratch, prefix="decrypted-") as plain:
        try:
            decrypt_to(_Prefixed(head, reader), plain, list(identities))  # type: ignore[arg-type]
        except IntegrityError as exc:
            named()  # damaged, else the key does not fit
            raise UnusableCopyError(f"pack {name}: {exc}") from None
        named()
        plain.seek(0)
        try:
            _decompress(plain, content)
        except IntegrityError as exc:  # authenticated by age: written so (a bomb, a bug)
            raise IntegrityError(f"pack {name}: {exc}") from None
    return True


def _parse_index(name: str, content: IO[bytes]) -> PackIndex:
    """The index at the end of a decompressed pack, checked for sense."""
    total = content.seek(0, os.SEEK_END)
    bad = f"pack {name}: not a pack, or a damaged one"
    if total < _TRAILER.size:
        raise IntegrityError(f"{bad} (too short)")
    content.seek(total - _TRAILER.size)
    length, magic = _TRAILER.unpack(content.read(_TRAILER.size))
    end = total - _TRAILER.size - length
    if magic != MAGIC or end < 0:
        raise IntegrityError(f"{bad} (no pack trailer)")
    content.seek(end)
    try:
        raw = json.loads(content.read(length))
        ids, blobs = raw["ids"], [BlobRef(str(i), int(o), int(n)) for i, o, n in raw["blobs"]]
        if raw["format"] != FORMAT or ids not in ("sha256", "hmac-sha256"):
            raise ValueError(f"format {raw['format']!r}, ids {ids!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{bad} (index: {exc})") from None
    for ref in blobs:
        if not _HEX64.match(ref.id) or ref.offset < 0 or ref.length < 0 \
                or ref.offset + ref.length > end:
            raise IntegrityError(f"{bad} (index entry {ref.id[:64]!r} out of place)")
    return PackIndex(name, ids, raw.get("key_id"), blobs)


class PackReader:
    """An opened pack (see :func:`open_pack`): its index, and its blobs, each checked."""

    def __init__(self, index: PackIndex, content: IO[bytes], key: bytes | None,
                 encrypted: bool = False) -> None:
        self.index = index
        self.encrypted = encrypted  # stored age-encrypted (rewriting it must encrypt too)
        self._content, self._key = content, key
        self._refs: dict[str, BlobRef] | None = None  # made on first lookup by id

    @property
    def _where(self) -> dict[str, BlobRef]:
        if self._refs is None:
            self._refs = {b.id: b for b in self.index.blobs}
        return self._refs

    def __contains__(self, blob: str) -> bool:
        return blob in self._where

    def read(self, blob: str) -> bytes:
        """Blob ``blob``'s bytes, checked against its id.

        Raises:
            IntegrityError: the pack does not hold it, or its bytes do not match the id.
        """
        ref = self._where.get(blob)
        if ref is None:
            raise IntegrityError(f"pack {self.index.name}: holds no blob {blob}")
        return self.read_ref(ref)

    def read_ref(self, ref: BlobRef) -> bytes:
        """The bytes of ``ref`` (one of ``index.blobs``: no lookup by id), checked against
        its id.

        Raises:
            IntegrityError: they do not match the id.
        """
        data = self.read_unchecked(ref)
        self.check(ref, data)
        return data

    def read_unchecked(self, ref: BlobRef) -> bytes:
        """The bytes at ``ref``'s place, not yet checked: the caller must :meth:`check`
        them before trusting them (in another thread, say: hashing releases the GIL)."""
        self._content.seek(ref.offset)
        return self._content.read(ref.length)

    def check(self, ref: BlobRef, data: bytes | memoryview) -> None:
        """Thread-safe: touches no file.

        Raises:
            IntegrityError: ``data`` is not blob ``ref``'s (its length or its id).
        """
        if len(data) != ref.length or blob_id(data, self._key) != ref.id:
            raise IntegrityError(f"pack {self.index.name}: blob {ref.id}: content does not "
                                 "match its id")

    def blobs(self) -> Iterator[tuple[str, bytes]]:
        """Every blob, in pack order, each checked (:meth:`read`)."""
        for ref in self.index.blobs:
            yield ref.id, self.read(ref.id)


def _check_key(index: PackIndex, key: bytes | None) -> None:
    """Refuse to judge blobs keyed with another dedup key (a configuration problem, not
    damage)."""
    if index.ids == "sha256":
        return
    if key is None:
        raise UnusableCopyError(f"pack {index.name}: blob ids are keyed (dedup key "
                                f"{index.key_id}); a dedup_key is needed to check them")
    if key_id(key) != index.key_id:
        raise UnusableCopyError(f"pack {index.name}: blob ids are keyed with dedup key "
                                f"{index.key_id}, not this one ({key_id(key)})")


@contextlib.contextmanager
def open_pack(name: str, stored: IO[bytes], scratch: Path, *, key: bytes | None = None,
              identities: Sequence[Any] | None = None) -> Iterator[PackReader]:
    """Read pack ``name`` from its stored bytes (read to the end), check them against the
    name, and yield a :class:`PackReader`. The decompressed pack lives in an unnamed
    temporary file in ``scratch`` while the block runs.

    Raises:
        IntegrityError: damaged (the stored bytes, the format, or a blob), naming the pack.
        UnusableCopyError: intact, but encrypted to another identity, or keyed with another
            dedup key (or none given). StorageError: ``stored`` cannot be read.
    """
    with tempfile.TemporaryFile(dir=scratch, prefix="pack-") as content:
        encrypted = _unpack(name, stored, content, scratch, identities)
        index = _parse_index(name, content)
        if index.ids == "sha256":
            key = None  # plain ids are checked as such, whatever this host's key
        _check_key(index, key)
        yield PackReader(index, content, key, encrypted)


def read_index(name: str, stored: IO[bytes], scratch: Path,
               identities: Sequence[Any] | None = None) -> PackIndex:
    """The index of pack ``name`` from its stored bytes alone (rebuilding a target's index).

    Raises:
        IntegrityError, UnusableCopyError, StorageError: as :func:`open_pack`.
    """
    with tempfile.TemporaryFile(dir=scratch, prefix="pack-") as content:
        _unpack(name, stored, content, scratch, identities)
        return _parse_index(name, content)


class OpenedPack(PackReader):
    """A :class:`PackReader` that owns its decompressed temporary file: made by
    :func:`unpack` in one thread (a download pool), read and closed in another.

    Its index is kept compact (32 raw bytes and two integers a blob, not a BlobRef and a hex
    string: a pack of 50,000 tiny blobs costs 2.4 MB, not 11), so a few open at once stay
    small: ``index.blobs`` is empty, :meth:`refs` gives them, :meth:`read_ref` reads one;
    lookups by id are not offered.
    """

    def __init__(self, index: PackIndex, content: IO[bytes], key: bytes | None) -> None:
        self.count = len(index.blobs)
        self._ids = b"".join(bytes.fromhex(b.id) for b in index.blobs)
        self._places = array.array("Q", (n for b in index.blobs for n in (b.offset, b.length)))
        super().__init__(dataclasses.replace(index, blobs=[]), content, key)
        self._file = content

    def refs(self) -> Iterator[BlobRef]:
        """Every blob's place, in pack order."""
        for i in range(self.count):
            yield BlobRef(self._ids[32 * i:32 * (i + 1)].hex(), self._places[2 * i],
                          self._places[2 * i + 1])

    def read(self, blob: str) -> bytes:
        raise NotImplementedError("OpenedPack reads by place: use refs() and read_ref()")

    @contextlib.contextmanager
    def mapped(self) -> Iterator[memoryview | None]:
        """The whole decompressed pack, mapped read-only (slices of it are blobs, copied by
        nobody), or None when it cannot be mapped (then :meth:`read_unchecked`). Nothing
        may keep a slice past the block."""
        try:
            whole = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            yield None
            return
        try:
            yield memoryview(whole)
        finally:
            # A slice still held (by an exception's traceback, say) keeps it open; it is
            # unmapped when that goes.
            with contextlib.suppress(BufferError):
                whole.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> OpenedPack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpack_content(name: str, stored: IO[bytes], scratch: Path,
                   identities: Sequence[Any] | None = None) -> IO[bytes]:
    """The decompressed pack, in an unnamed temporary file in ``scratch`` (the caller closes
    it), once the stored bytes are checked against ``name``: the costly half of
    :func:`unpack` (download, decrypt, decompress), for a worker thread.

    Raises:
        IntegrityError, UnusableCopyError, StorageError: as :func:`open_pack`.
    """
    content = tempfile.TemporaryFile(dir=scratch, prefix="pack-")  # noqa: SIM115  # returned
    try:
        _unpack(name, stored, content, scratch, identities)
    except BaseException:
        content.close()
        raise
    return content


def opened(name: str, content: IO[bytes], key: bytes | None = None) -> OpenedPack:
    """The :class:`OpenedPack` of a decompressed pack (:func:`unpack_content`), which then
    owns ``content`` (closed here on failure). Parsing its index in the thread that uses it
    keeps the JSON's transient memory out of the workers' malloc arenas.

    Raises:
        IntegrityError: not a pack, or a damaged one. UnusableCopyError: keyed with another
        dedup key (or none given).
    """
    try:
        index = _parse_index(name, content)
        if index.ids == "sha256":
            key = None  # plain ids are checked as such, whatever this host's key
        _check_key(index, key)
    except BaseException:
        content.close()
        raise
    return OpenedPack(index, content, key)


def unpack(name: str, stored: IO[bytes], scratch: Path, *, key: bytes | None = None,
           identities: Sequence[Any] | None = None) -> OpenedPack:
    """:func:`open_pack` without the ``with``: the caller closes the result (which removes
    its temporary file). Checked as :func:`open_pack` checks.

    Raises:
        IntegrityError, UnusableCopyError, StorageError: as :func:`open_pack`.
    """
    return opened(name, unpack_content(name, stored, scratch, identities), key)
