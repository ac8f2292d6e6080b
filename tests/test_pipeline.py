"""Stream stages: compression in standard formats, hashing, integrity errors, fan-out."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import subprocess
import threading

import pytest

from conexa_backup.config import CompressionConfig
from conexa_backup.errors import IntegrityError
from conexa_backup.pipeline import (
    CHUNK,
    Compressor,
    HashingReader,
    HashingSink,
    Tee,
    ThreadedSink,
    copy_stream,
    decompressing_reader,
    extension,
)

ALGORITHMS = ["zstd", "gzip"]
CLI = {"zstd": ["zstd", "-d", "-c"], "gzip": ["gzip", "-d", "-c"]}


def _mixed(size: int, seed: int = 1) -> bytes:
    """Alternating incompressible and very compressible stretches."""
    rng = random.Random(seed)
    parts: list[bytes] = []
    total = 0
    while total < size:
        n = rng.randint(1, 300_000)
        part = rng.randbytes(n) if rng.random() < 0.5 else (b"matr\xc3\xadcula;" * n)[:n]
        parts.append(part)
        total += n
    return b"".join(parts)[:size]


def _uneven_chunks(data: bytes, seed: int = 2) -> list[bytes]:
    rng = random.Random(seed)
    sizes = [0, 1, 7, 4096, CHUNK - 1, CHUNK + 3, 3 * CHUNK, 65_537, 13]
    chunks, pos = [], 0
    while pos < len(data):
        n = rng.choice(sizes)
        chunks.append(data[pos:pos + n])
        pos += n
    return chunks


INPUTS = {
    "empty": b"",
    "small": "Conceição — boletim\n".encode(),
    "large": _mixed(5 * CHUNK + 12_345),
}


def _compress(algorithm: str, chunks: list[bytes], **options: int) -> bytes:
    out = io.BytesIO()
    compressor = Compressor(CompressionConfig(algorithm=algorithm, **options), out)  # type: ignore[arg-type]
    for chunk in chunks:
        compressor.write(chunk)
    compressor.finish()
    return out.getvalue()


def _read_all(reader: io.RawIOBase | object, n: int = 100_000) -> bytes:
    parts = []
    while data := reader.read(n):  # type: ignore[attr-defined]
        parts.append(data)
    return b"".join(parts)


@pytest.fixture(scope="module")
def compressed() -> dict[tuple[str, str], bytes]:
    return {
        (alg, name): _compress(alg, _uneven_chunks(data) if data else [data])
        for alg in ALGORITHMS for name, data in INPUTS.items()
    }


# -- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip(compressed: dict[tuple[str, str], bytes], algorithm: str, name: str) -> None:
    blob = compressed[algorithm, name]
    assert blob  # even empty input yields a valid (non-empty) stream
    back = _read_all(decompressing_reader(io.BytesIO(blob), algorithm))
    assert back == INPUTS[name]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_round_trip_read_all_at_once(compressed: dict[tuple[str, str], bytes],
                                     algorithm: str) -> None:
    blob = compressed[algorithm, "large"]
    assert decompressing_reader(io.BytesIO(blob), algorithm).read() == INPUTS["large"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_large_input_is_actually_compressed(compressed: dict[tuple[str, str], bytes],
                                            algorithm: str) -> None:
    assert len(compressed[algorithm, "large"]) < 0.8 * len(INPUTS["large"])


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_stock_cli_decompresses(compressed: dict[tuple[str, str], bytes], algorithm: str,
                                name: str) -> None:
    if shutil.which(CLI[algorithm][0]) is None:
        pytest.skip(f"{CLI[algorithm][0]} not installed")
    proc = subprocess.run(CLI[algorithm], input=compressed[algorithm, name],
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == INPUTS[name]


def test_zstd_levels_and_threads_round_trip() -> None:
    data = INPUTS["large"]
    one = _compress("zstd", [data], level=1, threads=1)
    nineteen = _compress("zstd", [data], level=19, threads=2)
    assert len(nineteen) <= len(one)
    for blob in (one, nineteen):
        assert decompressing_reader(io.BytesIO(blob), "zstd").read() == data


def test_gzip_level_round_trip() -> None:
    data = INPUTS["large"][: CHUNK]
    blob = _compress("gzip", [data], level=1)
    assert blob[:2] == b"\x1f\x8b"  # a gzip member, not a raw zlib stream
    assert decompressing_reader(io.BytesIO(blob), "gzip").read() == data


def test_zstd_concatenated_frames() -> None:
    a, b = b"first frame " * 100, b"second frame " * 100
    blob = _compress("zstd", [a]) + _compress("zstd", [b])
    assert decompressing_reader(io.BytesIO(blob), "zstd").read() == a + b


def test_extension() -> None:
    assert extension("zstd") == ".zst"
    assert extension("gzip") == ".gz"


def test_unknown_algorithm_is_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="lz4"):
        decompressing_reader(io.BytesIO(b""), "lz4")


# -- damage -------------------------------------------------------------------------------------

def _flip(blob: bytes, at: int) -> bytes:
    damaged = bytearray(blob)
    damaged[at] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_corrupted_middle_is_integrity_error(compressed: dict[tuple[str, str], bytes],
                                             algorithm: str) -> None:
    blob = compressed[algorithm, "large"]
    for at in (len(blob) // 3, len(blob) // 2, len(blob) - 6):
        with pytest.raises(IntegrityError, match="damaged compressed data"):
            _read_all(decompressing_reader(io.BytesIO(_flip(blob, at)), algorithm))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_garbage_is_integrity_error(algorithm: str) -> None:
    garbage = random.Random(5).randbytes(10_000)
    with pytest.raises(IntegrityError):
        _read_all(decompressing_reader(io.BytesIO(garbage), algorithm))


def test_truncated_gzip_is_integrity_error(compressed: dict[tuple[str, str], bytes]) -> None:
    for name in INPUTS:
        blob = compressed["gzip", name]
        for cut in (len(blob) // 2, len(blob) - 1, len(blob) - 8):
            with pytest.raises(IntegrityError):
                _read_all(decompressing_reader(io.BytesIO(blob[:cut]), "gzip"))


def test_truncated_zstd_still_caught_by_stored_checksum(
        compressed: dict[tuple[str, str], bytes]) -> None:
    """Defence in depth: restores hash the stored bytes, so truncation is still an error."""
    blob = compressed["zstd", "large"]
    reader = HashingReader(io.BytesIO(blob[:-4]))
    _read_all(decompressing_reader(reader, "zstd"))  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="size"):
        reader.check(len(blob), hashlib.sha256(blob).hexdigest(), "db.dump.zst")


# -- hashing ------------------------------------------------------------------------------------

def test_hashing_sink_matches_hashlib() -> None:
    data = INPUTS["large"]
    out = io.BytesIO()
    sink = HashingSink(out)
    for chunk in _uneven_chunks(data, seed=9):
        assert sink.write(chunk) == len(chunk)
    assert sink.size == len(data)
    assert sink.hexdigest() == hashlib.sha256(data).hexdigest()
    assert out.getvalue() == data


def test_hashing_sink_empty() -> None:
    sink = HashingSink(io.BytesIO())
    assert sink.size == 0
    assert sink.hexdigest() == hashlib.sha256(b"").hexdigest()


def test_compressor_into_hashing_sink() -> None:
    """The backup chain: what the sink hashes is exactly what reaches the target."""
    out = io.BytesIO()
    sink = HashingSink(out)
    compressor = Compressor(CompressionConfig(), sink)
    for chunk in _uneven_chunks(INPUTS["large"]):
        compressor.write(chunk)
    compressor.finish()
    stored = out.getvalue()
    assert sink.size == len(stored)
    assert sink.hexdigest() == hashlib.sha256(stored).hexdigest()


def test_hashing_reader_check_passes() -> None:
    data = INPUTS["large"]
    reader = HashingReader(io.BytesIO(data))
    assert reader.read(10) == data[:10]
    reader.check(len(data), hashlib.sha256(data).hexdigest(), "x")  # drains the rest
    assert reader.size == len(data)


def test_hashing_reader_wrong_size() -> None:
    data = b"some stored bytes"
    reader = HashingReader(io.BytesIO(data))
    with pytest.raises(IntegrityError, match=r"uploads\.tar\.zst: size 17 bytes, manifest says 18"):
        reader.check(18, hashlib.sha256(data).hexdigest(), "uploads.tar.zst")


def test_hashing_reader_wrong_sha256() -> None:
    data = b"some stored bytes"
    reader = HashingReader(io.BytesIO(data))
    with pytest.raises(IntegrityError, match="SHA-256"):
        reader.check(len(data), hashlib.sha256(b"other bytes").hexdigest(), "db.dump.zst")


# -- fan-out and copying ------------------------------------------------------------------------

def test_tee_writes_to_every_sink() -> None:
    sinks = [io.BytesIO(), io.BytesIO(), HashingSink(io.BytesIO())]
    tee = Tee(sinks)
    chunks = [b"a", b"", b"bc" * 1000, b"d"]
    for chunk in chunks:
        assert tee.write(chunk) == len(chunk)
    expected = b"".join(chunks)
    assert sinks[0].getvalue() == expected  # type: ignore[union-attr]
    assert sinks[1].getvalue() == expected  # type: ignore[union-attr]
    assert sinks[2].hexdigest() == hashlib.sha256(expected).hexdigest()  # type: ignore[union-attr]


def test_copy_stream_counts_bytes() -> None:
    data = INPUTS["large"]
    out = io.BytesIO()
    assert copy_stream(io.BytesIO(data), out, chunk=100_003) == len(data)
    assert out.getvalue() == data


class _FailsAfter:
    """A sink whose ``n``-th write raises OSError (a full disk); it counts what it got."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got = bytearray()

    def write(self, data: bytes) -> int:
        self.n -= 1
        if self.n < 0:
            raise OSError(28, "No space left on device")
        self.got += data
        return len(data)


def test_threaded_sink_writes_everything_in_order() -> None:
    data = _mixed(5 * CHUNK + 123)
    out = io.BytesIO()
    with ThreadedSink(out, "t", depth=2) as sink:
        assert copy_stream(io.BytesIO(data), sink) == len(data)
    assert out.getvalue() == data


def test_threaded_sink_raises_the_writers_error_on_close() -> None:
    target = _FailsAfter(2)
    go = threading.Event()
    gated = _Gated(target, go)
    sink = ThreadedSink(gated, "t", depth=8)
    for _ in range(4):  # all queued before the thread writes any: no write can see the error
        sink.write(b"x" * 10)
    go.set()
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert bytes(target.got) == b"x" * 20


class _Gated:
    """Passes writes on once ``go`` is set."""

    def __init__(self, out: _FailsAfter, go: threading.Event) -> None:
        self.out = out
        self.go = go

    def write(self, data: bytes) -> int:
        self.go.wait()
        return self.out.write(data)


def test_threaded_sink_raises_on_the_next_write_and_wraps() -> None:
    sink = ThreadedSink(_FailsAfter(0), "t", depth=1,
                        wrap_error=lambda exc: IntegrityError(f"wrapped: {exc}"))
    sink.write(b"a")
    with pytest.raises(IntegrityError, match=r"wrapped: .*No space"):
        for _ in range(100):  # the thread fails the first one; a later write raises it
            sink.write(b"b")
    sink.stop()  # never raises
    with pytest.raises(IntegrityError):
        sink.close()


def test_threaded_sink_leaving_by_an_exception_keeps_that_exception() -> None:
    with pytest.raises(KeyError), ThreadedSink(_FailsAfter(0), "t", depth=4) as sink:
        sink.write(b"a")
        raise KeyError("the producer's own failure")


def test_threaded_sink_abandon_drops_what_is_queued() -> None:
    target = _FailsAfter(100)
    go = threading.Event()
    sink = ThreadedSink(_Gated(target, go), "t", depth=8)
    for _ in range(4):
        sink.write(b"x")
    release = threading.Timer(0.2, go.set)  # the write in flight finishes after abandon()
    release.start()
    sink.abandon()
    release.join()
    assert bytes(target.got) in (b"", b"x")  # at most the one in flight, never the queue
    assert not any(t.name == "t" for t in threading.enumerate())
