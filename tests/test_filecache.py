"""The file cache (issue 15): what it reuses, what it forgets, how it survives crashes and
corruption, which files it re-reads anyway, and that its memory stays flat."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conexa_backup import filecache
from conexa_backup.filecache import (
    FOLDER,
    Entry,
    FileCache,
    cache_path,
    key_fingerprint,
    rehash_chosen,
)

FP = key_fingerprint(b"k" * 32)
ROOT = Path("/srv/uploads")
BLOBS = ["aa" * 32, "bb" * 32]
SHA = "cc" * 32
CHILD_TIMEOUT = 60


def fake_stat(size: int, mtime_ns: int, ctime_ns: int, ino: int) -> os.stat_result:
    """A stat result with the four fields the cache compares (and plausible others)."""
    seq = (0o100644, ino, 1, 1, 0, 0, size, 0, mtime_ns // 10**9, ctime_ns // 10**9)
    return os.stat_result(seq, {"st_mtime_ns": mtime_ns, "st_ctime_ns": ctime_ns, "st_atime_ns": 0})


def open_cache(state: Path, **kwargs: object) -> FileCache:
    return FileCache.open(state, ROOT, FP, **kwargs)  # type: ignore[arg-type]


def test_unchanged_file_is_reused_with_its_payload(tmp_path: Path) -> None:
    state, f = tmp_path / "state", tmp_path / "photo.jpg"
    f.write_bytes(b"x" * 100)
    with open_cache(state) as cache:
        assert cache.lookup("photo.jpg", f.stat()) is None
        cache.record("photo.jpg", f.stat(), BLOBS, SHA)
        wrote = cache.run
    with open_cache(state) as cache:
        entry = cache.lookup("photo.jpg", f.stat())
        assert cache.run > wrote
    st = f.stat()
    assert entry == Entry(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, tuple(BLOBS), SHA,
                          written=wrote)


def test_empty_blob_list_and_undecodable_name_round_trip(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.txt")  # not UTF-8: a surrogate in the str, kept as its bytes
    st = fake_stat(0, 1, 2, 3)
    with open_cache(tmp_path) as cache:
        cache.record(name, st, [], SHA)
        cache.record("caf\xe9.txt", fake_stat(5, 1, 2, 4), BLOBS, SHA)  # the UTF-8 spelling
        wrote = cache.run
    with open_cache(tmp_path) as cache:
        assert cache.lookup(name, st) == Entry(0, 1, 2, 3, (), SHA, wrote)
        assert cache.lookup("caf\xe9.txt", fake_stat(5, 1, 2, 4)) is not None


@pytest.mark.parametrize("change", ["content, mtime put back", "utime", "chmod", "new inode"])
def test_real_file_changes_are_misses(tmp_path: Path, change: str) -> None:
    state, f = tmp_path / "state", tmp_path / "doc.pdf"
    f.write_bytes(b"a" * 50)
    before = f.stat()
    with open_cache(state) as cache:
        cache.record("doc.pdf", before, BLOBS, SHA)
    deadline = time.monotonic() + 10
    while True:  # ctime has the clock's granularity: change until the kernel shows it
        if change == "content, mtime put back":
            f.write_bytes(b"b" * 60)
            os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
        elif change == "utime":
            os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 1))
        elif change == "chmod":
            f.chmod(0o600 if stat.S_IMODE(f.stat().st_mode) != 0o600 else 0o640)
        else:
            other = tmp_path / "other"
            other.write_bytes(b"a" * 50)
            os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
            other.replace(f)
        after = f.stat()
        if after.st_ctime_ns != before.st_ctime_ns or change == "utime":
            break
        assert time.monotonic() < deadline, "ctime never moved"
    with open_cache(state) as cache:
        assert cache.lookup("doc.pdf", after) is None
        assert cache.lookup("doc.pdf", before) is not None  # the entry itself is intact


@pytest.mark.parametrize("field", [0, 1, 2, 3])
def test_each_stat_field_alone_makes_a_miss(tmp_path: Path, field: int) -> None:
    values = [10, 20, 30, 40]
    with open_cache(tmp_path) as cache:
        cache.record("f", fake_stat(*values), BLOBS, SHA)
        changed = list(values)
        changed[field] += 1
        assert cache.lookup("f", fake_stat(*changed)) is None
        assert cache.lookup("f", fake_stat(*values)) is not None


def test_record_refuses_what_is_not_lowercase_hex(tmp_path: Path) -> None:
    with open_cache(tmp_path) as cache:
        for blobs, sha in ([["AB"], SHA], [["a,b"], SHA], [BLOBS, ""], [BLOBS, "xyz"]):
            with pytest.raises(ValueError, match="hex"):
                cache.record("f", fake_stat(1, 1, 1, 1), blobs, sha)


def test_finish_drops_files_not_seen_this_run(tmp_path: Path) -> None:
    st = fake_stat(1, 1, 1, 1)
    with open_cache(tmp_path) as cache:
        for name in ("a", "b", "c"):
            cache.record(name, st, BLOBS, SHA)
        assert cache.finish() == 0
    with open_cache(tmp_path) as cache:
        assert cache.lookup("a", st) is not None
        assert cache.lookup("c", fake_stat(2, 2, 2, 2)) is None  # changed: not seen
        cache.record("d", st, BLOBS, SHA)
        assert cache.finish() == 2  # b (deleted) and c (changed, not recorded again)
        assert len(cache) == 2
    with open_cache(tmp_path) as cache:
        assert cache.lookup("b", st) is None
        assert cache.lookup("c", st) is None
        assert cache.lookup("a", st) is not None


def test_a_folders_entries_are_read_in_order_a_few_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FolderFiles: the walk's lookups answered from a few queries, not one each; matches
    kept and entries not met (deleted, changed) dropped by finish, as with point lookups."""
    monkeypatch.setattr(filecache, "FILES_AHEAD", 7)
    st = fake_stat(1, 1, 1, 1)
    names = [f"big/f{i:04d}" for i in range(100)]
    with open_cache(tmp_path) as cache:
        for name in [*names, "other/a", "big-sibling/x"]:
            cache.record(name, st, BLOBS, SHA)
        wrote = cache.run
        cache.finish()
    statements: list[str] = []
    with open_cache(tmp_path) as cache:
        cache._conn.set_trace_callback(statements.append)
        files = cache.files_of("big")
        met = [n for i, n in enumerate(names) if i % 10 != 3]  # every tenth deleted
        for i, name in enumerate(met):
            changed = i % 10 == 5
            found = files.lookup(name, fake_stat(2, 2, 2, 2) if changed else st)
            assert (found is None) == changed, name
            if found is not None:
                assert found == Entry(1, 1, 1, 1, tuple(BLOBS), SHA, wrote)
        assert files.lookup("big/f0001", st) is not None  # out of order: a point lookup
        assert files.lookup("big/zzz", st) is None  # past the last entry
        cache._conn.set_trace_callback(None)
        assert cache.lookup("other/a", st) is not None
        assert cache.lookup("big-sibling/x", st) is not None
        dropped = cache.finish()
    reads = [q for q in statements if q.startswith("SELECT")]
    assert 100 // 7 <= len(reads) <= 100 // 7 + 3, reads  # a query per 7 entries, not per file
    changed = sum(1 for i in range(len(met)) if i % 10 == 5)
    assert dropped == len(names) - len(met) + changed
    with open_cache(tmp_path) as cache:
        assert len(cache) == len(met) - changed + 2


def test_a_run_that_stops_early_forgets_nothing(tmp_path: Path) -> None:
    st = fake_stat(1, 1, 1, 1)
    with open_cache(tmp_path) as cache:
        for name in ("a", "b"):
            cache.record(name, st, BLOBS, SHA)
    with open_cache(tmp_path) as cache:
        cache.lookup("a", st)  # then the walk fails: no finish()
    with open_cache(tmp_path) as cache:
        assert len(cache) == 2


def test_other_key_or_root_sees_nothing(tmp_path: Path) -> None:
    st = fake_stat(1, 1, 1, 1)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        cache.record("a", st, BLOBS, SHA)
    other_key = key_fingerprint(b"j" * 32)
    assert len({other_key, FP, key_fingerprint(None)}) == 3
    for root, fp in ((ROOT, other_key), (ROOT, key_fingerprint(None)), (Path("/srv/other"), FP)):
        with FileCache.open(tmp_path, root, fp) as cache:
            assert cache.lookup("a", st) is None
            assert len(cache) == 0
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.lookup("a", st) is not None
    assert len(list((tmp_path / FOLDER).glob("*.sqlite"))) == 4


def test_cache_file_is_0600_in_a_0700_folder(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with open_cache(tmp_path / "state") as cache:
            cache.record("a", fake_stat(1, 1, 1, 1), BLOBS, SHA)
            files = list(cache.path.parent.iterdir())
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
            assert stat.S_IMODE(cache.path.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    finally:
        os.umask(old)
    assert modes and set(modes.values()) == {0o600}, modes  # the WAL files too


@pytest.mark.parametrize("damage", ["garbage", "damaged pages", "a folder"])
def test_corrupt_cache_is_moved_aside_and_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    st = fake_stat(1, 1, 1, 1)
    with open_cache(tmp_path) as cache:
        for i in range(3000):
            cache.record(f"dir/file{i:05d}", st, BLOBS, SHA)
    path = cache_path(tmp_path, ROOT, FP)
    if damage == "garbage":
        path.write_bytes(b"not a database at all" * 100)
    elif damage == "damaged pages":
        with path.open("r+b") as fh:
            fh.seek(8192)
            fh.write(random.Random(1).randbytes(65536))
    else:
        path.unlink()
        path.mkdir()
    with caplog.at_level(logging.WARNING), open_cache(tmp_path) as cache:
        assert len(cache) == 0
        assert cache.lookup("dir/file00001", st) is None
        cache.record("dir/file00001", st, BLOBS, SHA)
    assert "moved aside" in caplog.text
    assert len(list(path.parent.glob(f"{path.name}.corrupt-*"))) == 1
    with open_cache(tmp_path) as cache:
        assert cache.lookup("dir/file00001", st) is not None


@pytest.mark.parametrize("found_by", ["lookup", "finish"])
def test_corruption_found_mid_run_rebuilds_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, found_by: str
) -> None:
    st = fake_stat(1, 1, 1, 1)
    with open_cache(tmp_path) as cache:
        for i in range(3000):
            cache.record(f"dir/file{i:05d}", st, BLOBS, SHA)
    with caplog.at_level(logging.WARNING), open_cache(tmp_path) as cache:
        with cache.path.open("r+b") as fh:  # damaged after the open's check passed
            fh.seek(8192)
            fh.write(random.Random(1).randbytes(65536))
        cache._conn.execute("PRAGMA shrink_memory")  # so the next read goes to the file
        if found_by == "lookup":
            assert cache.lookup("dir/file01500", st) is None
            assert "moved aside" in caplog.text
            cache.record("dir/file01500", st, BLOBS, SHA)
            assert cache.lookup("dir/file01500", st) is not None
        assert cache.finish() == 0
        assert "moved aside" in caplog.text
    with open_cache(tmp_path) as cache:
        assert len(cache) == (1 if found_by == "lookup" else 0)


def test_a_cache_locked_by_another_run_is_not_moved_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = fake_stat(1, 1, 1, 1)
    with open_cache(tmp_path) as cache:
        cache.record("a", st, BLOBS, SHA)
    monkeypatch.setattr(filecache, "BUSY_TIMEOUT_MS", 50)
    other = sqlite3.connect(cache_path(tmp_path, ROOT, FP), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another run writing
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            open_cache(tmp_path)
    finally:
        other.close()
    assert not list((tmp_path / FOLDER).glob("*.corrupt-*"))
    with open_cache(tmp_path) as cache:
        assert cache.lookup("a", st) is not None


CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from conexa_backup.filecache import FileCache
    pause_at = int(sys.argv[2])
    st = os.stat_result((0o100644, 1, 1, 1, 0, 0, 5, 0, 0, 0),
                        {"st_mtime_ns": 7, "st_ctime_ns": 8, "st_atime_ns": 0})
    cache = FileCache.open(Path(sys.argv[1]), Path("/srv/uploads"), sys.argv[3], batch=100)
    i = 0
    while True:
        cache.record(f"f{i:07d}", st, ["ab" * 32], "cd" * 32)
        i += 1
        if i == pause_at:
            print("ready", flush=True)
            if sys.argv[4] == "wait":
                sys.stdin.readline()
    """
)


def run_and_kill(state: Path, pause_at: int, mode: str) -> None:
    """Start a child that records entries (batches of 100); SIGKILL it once it says it
    recorded ``pause_at`` (waiting there, or going on writing)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), str(pause_at), FP, mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT)


def committed(state: Path, caplog: pytest.LogCaptureFixture) -> int:
    st = fake_stat(5, 7, 8, 1)
    with caplog.at_level(logging.WARNING), open_cache(state) as cache:
        count = len(cache)
        for i in (0, count - 1):
            assert cache.lookup(f"f{i:07d}", st) is not None
        assert cache.lookup(f"f{count:07d}", st) is None
    assert "moved aside" not in caplog.text
    return count


def test_killed_between_batches_keeps_whole_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_and_kill(tmp_path, 250, "wait")
    assert committed(tmp_path, caplog) == 200


def test_killed_while_writing_keeps_whole_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for attempt in range(3):
        state = tmp_path / str(attempt)
        run_and_kill(state, 1000, "go on")
        count = committed(state, caplog)
        assert count >= 1000
        assert count % 100 == 0


def test_rehash_share_per_run_and_every_file_within_the_period() -> None:
    paths = [f"y{i // 100}/f{i}.jpg" for i in range(3000)]
    for seed, share, period in ((b"s1", 0.01, 100), (b"s2", 0.03, 34), (b"s3", 0.007, 143)):
        first = 1000 + len(seed) * 37
        last_read = dict.fromkeys(paths, first - 1)
        for run in range(first, first + 2 * period):
            chosen = [p for p in paths if rehash_chosen(seed, run, p, share)]
            expected = share * len(paths)
            assert abs(len(chosen) - expected) < 5 * (expected**0.5) + 2, (share, run)
            for p in chosen:
                assert run - last_read[p] <= period, (p, run, last_read[p])
                last_read[p] = run
        assert all(first + 2 * period - 1 - r < period for r in last_read.values())


def test_rehash_choice_is_deterministic_and_depends_on_seed_and_run() -> None:
    paths = [f"f{i}" for i in range(3000)]

    def pick(seed: bytes, run: int) -> set[str]:
        return {p for p in paths if rehash_chosen(seed, run, p, 0.05)}

    assert pick(b"a", 7) == pick(b"a", 7)
    assert pick(b"a", 7) != pick(b"b", 7)
    assert not pick(b"a", 7) & pick(b"a", 8)  # next run, next window of the wheel
    assert not any(rehash_chosen(b"a", 1, p, 0.0) for p in paths)
    assert all(rehash_chosen(b"a", 1, p, 1.0) for p in paths)
    with pytest.raises(ValueError, match="between 0 and 1"):
        rehash_chosen(b"a", 1, "f", 1.5)


def test_cache_rehashes_a_share_each_run_and_all_with_rehash(tmp_path: Path) -> None:
    st = fake_stat(1, 1, 1, 1)
    paths = [f"f{i}" for i in range(400)]
    with open_cache(tmp_path) as cache:
        for p in paths:
            cache.record(p, st, BLOBS, SHA)
    never_read = set(paths)
    for _ in range(50):  # 50 runs at 2%: every file re-read at least once
        with open_cache(tmp_path, rehash_share=0.02, seed=b"fixed") as cache:
            chosen = {p for p in paths if cache.should_rehash(p)}
            assert 0 < len(chosen) < 30
            assert all(cache.lookup(p, st) is not None for p in paths)  # chosen or not
            never_read -= chosen
    assert not never_read
    with open_cache(tmp_path, rehash_all=True) as cache:
        assert all(cache.should_rehash(p) for p in paths)
        assert all(cache.lookup(p, st) is not None for p in paths)


MEMORY_CHILD = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from conexa_backup.filecache import FileCache
    N = int(sys.argv[2])
    def st(i):
        return os.stat_result((0o100644, i, 1, 1, 0, 0, i * 7, 0, 0, 0),
                              {"st_mtime_ns": i * 11, "st_ctime_ns": i * 13, "st_atime_ns": 0})
    blob = "ab" * 32
    def kib(field):  # this process's own figures (see the test's docstring)
        status = Path("/proc/self/status").read_text()
        return int(status.split(field + ":")[1].split()[0])
    def path(i):
        return f"{2000 + i % 25}/class{i % 300:03d}/student{i:07d}/homework-{i}.pdf"
    with FileCache.open(Path(sys.argv[1]), Path("/srv/uploads"), "fp") as cache:
        cache.lookup(path(0), st(0))
        cache.record(path(0), st(0), [blob], blob)
        base = kib("VmRSS")  # resident now, not the peak so far (the imports' may be higher)
        for i in range(N):
            if cache.lookup(path(i), st(i)) is None:
                cache.record(path(i), st(i), [blob], blob)
        cache.finish()
    with FileCache.open(Path(sys.argv[1]), Path("/srv/uploads"), "fp") as cache:
        hits = sum(cache.lookup(path(i), st(i)) is not None for i in range(N))
        dropped = cache.finish()
    peak = kib("VmHWM")
    print(base, peak, hits, dropped)
    """
)


def test_memory_stays_flat_over_200000_entries(tmp_path: Path) -> None:
    """Two runs over 200,000 entries (all misses, then all hits) in a child process.

    Peak RSS is the child's VmHWM, not ``getrusage().ru_maxrss``: Linux carries the parent's
    high-water mark across fork and exec into ru_maxrss (here pytest's 70 MB, which hid
    everything below it).
    """
    n = 200_000
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path), str(n)],
        capture_output=True,
        text=True,
        check=True,
        timeout=CHILD_TIMEOUT * 3,
    ).stdout.split()
    base_kib, peak_kib, hits, dropped = map(int, out)
    assert (hits, dropped) == (n, 0)
    growth_mb = (peak_kib - base_kib) / 1024
    # measured 7.8 MB (SQLite's page cache, capped at 8 MB); the same run holding a set of the
    # 200,000 paths seen grows 35.8 MB
    assert growth_mb < 20, f"peak RSS grew {growth_mb:.1f} MB over {n} entries"


OLDER = {
    "1": "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;"
         "CREATE TABLE files (path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER "
         "NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, sha256 TEXT NOT NULL, "
         "blobs TEXT NOT NULL, seen INTEGER NOT NULL) WITHOUT ROWID;"
         "INSERT INTO files VALUES (x'612e747874', 1, 2, 3, 4, 'ab', 'ab', 1);",
    "2": "CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;"
         "INSERT INTO meta VALUES ('version', '2'), ('run', '7');"
         "CREATE TABLE files (path BLOB PRIMARY KEY, dir BLOB NOT NULL, size INTEGER NOT NULL,"
         " mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, "
         "sha256 TEXT NOT NULL, blobs TEXT NOT NULL, seen INTEGER NOT NULL) WITHOUT ROWID;"
         "INSERT INTO files VALUES (x'612e747874', x'2e', 1, 2, 3, 4, 'ab', 'ab', 7);",
}


@pytest.mark.parametrize("version", sorted(OLDER))
def test_a_cache_of_an_older_format_starts_again(tmp_path: Path, version: str) -> None:
    path = filecache.cache_path(tmp_path, ROOT, FP)
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(OLDER[version])
    db.close()
    with open_cache(tmp_path) as cache:
        assert cache.path == path and len(cache) == 0 and cache.run == 1
        cache.record("a.txt", fake_stat(1, 2, 3, 4), ["ab"], "ab")
        found = cache.lookup("a.txt", fake_stat(1, 2, 3, 4))
        assert found is not None and found.blobs == ("ab",)
