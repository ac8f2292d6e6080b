"""Stream stages: compression and hashing on large buffers (fan-out is storage/fanout.py).

Bytes are pushed through a chain of sinks (anything with ``write(bytes)``):
producer -> :class:`Compressor` -> :class:`HashingSink` -> target upload(s).
Heavy work happens in zstd's own threads and in hashlib, which release the GIL on large
buffers; Python only moves references to 1 MiB chunks.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import queue
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import IO, BinaryIO, Protocol

import zstandard

from conexa_backup import signals
from conexa_backup.config import CompressionConfig
from conexa_backup.errors import IntegrityError

CHUNK = 1 << 20
# Level 1, measured on pg_dump custom archives (docs/benchmarks.md, and the shared baseline):
# faster than 3 and, on this data, even smaller; on 2 cores it keeps the producer the limit.
ZSTD_DEFAULT_LEVEL = 1


class Sink(Protocol):
    def write(self, data: bytes) -> object: ...


class Compressor:
    """A sink that compresses and passes compressed bytes on; call :meth:`finish` at the end."""

    def __init__(self, config: CompressionConfig, out: Sink) -> None:
        self._out = out
        self.algorithm = config.algorithm
        self._zstd: zstandard.ZstdCompressionWriter | None = None
        self._zlib: zlib._Compress | None = None
        if config.algorithm == "zstd":
            threads = config.threads or os.cpu_count() or 1
            # 1 MiB jobs: each worker's buffers stay small (measured: -7 MB of peak RSS
            # against zstd's default at level 1, same speed and size on our data).
            params = zstandard.ZstdCompressionParameters.from_level(
                config.level or ZSTD_DEFAULT_LEVEL, threads=threads, write_checksum=True,
                job_size=CHUNK if threads > 1 else 0)
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self._zstd = cctx.stream_writer(out, write_size=CHUNK, closefd=False)  # type: ignore[arg-type]
        else:
            # wbits=31: a gzip member, readable by gunzip/``zstd -d``'s gzip support and tar -z.
            self._zlib = zlib.compressobj(config.level or 6, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> None:
        if self._zstd is not None:
            self._zstd.write(data)
        else:
            assert self._zlib is not None
            out = self._zlib.compress(data)
            if out:
                self._out.write(out)

    def finish(self) -> None:
        if self._zstd is not None:
            self._zstd.flush(zstandard.FLUSH_FRAME)
        else:
            assert self._zlib is not None
            self._out.write(self._zlib.flush())


def extension(algorithm: str) -> str:
    """File-name suffix for an algorithm: what stock tools expect."""
    return {"zstd": ".zst", "gzip": ".gz"}[algorithm]


class _Decompressed:
    """A readable of decompressed bytes; damaged input raises IntegrityError."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except (zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise IntegrityError(f"damaged compressed data: {exc}") from None

    def readable(self) -> bool:
        return True


def decompressing_reader(raw: BinaryIO, algorithm: str) -> IO[bytes]:
    """A readable of the decompressed bytes of ``raw`` (IntegrityError when damaged).

    A zstd stream cut at a frame boundary, or mid-frame, may end early without an error:
    zstandard's bounded-memory reader treats it as end of input. Callers always pair this with
    the manifest's size and SHA-256 of the stored bytes (``fetch.read_verified``), which is
    what catches truncation; its output is provisional until that check passes.
    """
    inner: IO[bytes]
    if algorithm == "zstd":
        inner = zstandard.ZstdDecompressor().stream_reader(
            raw, read_size=CHUNK, read_across_frames=True
        )
    elif algorithm == "gzip":
        inner = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    else:
        raise IntegrityError(f"unknown compression {algorithm!r}")
    return _Decompressed(inner)  # type: ignore[return-value]


class Gather:
    """A sink that gathers small writes (tar headers, 64 KiB age pieces) into CHUNK-sized
    writes to ``out``, so the byte path downstream sees large buffers; large ``bytes`` pass
    straight on. ``written`` counts what it was given. Call :meth:`flush` at the end.
    """

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._buf = bytearray()
        self.written = 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if len(data) >= CHUNK and isinstance(data, bytes):  # immutable: safe to hand on
            self.flush()
            self._out.write(data)
        else:
            self._buf += data
            if len(self._buf) >= CHUNK:
                self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            # Handed over, never touched again: a sink may queue it for another thread.
            chunk, self._buf = self._buf, bytearray()
            self._out.write(chunk)  # type: ignore[arg-type]  # any bytes-like object will do


_END = object()
PUT_TRY_SECONDS = 0.2  # how late a signal may be raised while the queue is full


class ThreadedSink:
    """A sink that writes to ``out`` from a thread of its own, fed through a queue of
    ``depth`` chunks: the producer and the writes overlap, and memory stays at ``depth``
    chunks. An error in the thread (passed through ``wrap_error``) is kept, what is queued
    after it is dropped, and it is raised by the next :meth:`write` or by :meth:`close`.
    """

    def __init__(self, out: Sink, name: str, depth: int,
                 wrap_error: Callable[[BaseException], BaseException] = lambda exc: exc) -> None:
        self._out = out
        self._wrap = wrap_error
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        signals.start(self._thread)

    def _run(self) -> None:
        while (item := self._queue.get()) is not _END:
            if self._error is None and not self._dropping:
                try:
                    self._out.write(item)  # type: ignore[arg-type]
                except BaseException as exc:  # handed to the producer's thread
                    self._error = self._wrap(exc)

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._put(data)
        return len(data)

    def _put(self, item: object) -> None:
        """Queue ``item``, waiting for room. A signal meanwhile is raised between two tries,
        never inside the queue's own locking, which it would break (see signals.held)."""
        while True:
            with signals.held(), contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=PUT_TRY_SECONDS)
                return

    def stop(self) -> None:
        """Let the thread write what is queued, then end it; never raises but a signal's
        :class:`~conexa_backup.signals.Interrupted`."""
        if self._thread.is_alive():
            self._put(_END)
            self._thread.join()

    def abandon(self) -> None:
        """End the thread without writing what is still queued (the stream is being thrown
        away: an interrupted run gets out sooner); never raises."""
        self._dropping = True
        self.stop()

    def close(self) -> None:
        """:meth:`stop`, then raise the thread's error if it had one."""
        self.stop()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> ThreadedSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        """Leaving normally closes (raising the thread's error); leaving by an exception
        abandons what is queued, and that exception is the one that propagates."""
        if exc_type is None:
            self.close()
        else:
            self.abandon()


class HashingSink:
    """Counts bytes and computes SHA-256 of everything written, then passes it on."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        self._out.write(data)
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class Tee:
    """Writes every chunk to each of several sinks (one producer, several targets)."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self._sinks = list(sinks)

    def write(self, data: bytes) -> int:
        for sink in self._sinks:
            sink.write(data)
        return len(data)


class HashingReader:
    """Wraps a readable: hashes and counts what is read; :meth:`check` compares at the end."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        """SHA-256 hex of what was read so far."""
        return self._hash.hexdigest()

    def drain(self) -> None:
        """Read to the end (so the hash covers the whole object)."""
        while self.read(CHUNK):
            pass

    def check(self, size: int, sha256: str, what: str) -> None:
        """Raise IntegrityError unless everything read matches ``size`` and ``sha256``."""
        self.drain()
        if self.size != size:
            raise IntegrityError(f"{what}: size {self.size} bytes, manifest says {size}")
        digest = self._hash.hexdigest()
        if digest != sha256:
            raise IntegrityError(f"{what}: SHA-256 {digest} does not match the manifest")


def hash_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file's contents, read in large chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(CHUNK):
            digest.update(data)
    return digest.hexdigest()


def copy_stream(src: IO[bytes], dst: Sink, chunk: int = CHUNK) -> int:
    """Copy ``src`` to ``dst`` in large chunks; return the byte count."""
    total = 0
    while True:
        data = src.read(chunk)
        if not data:
            return total
        dst.write(data)
        total += len(data)
