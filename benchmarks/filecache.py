"""Benchmark the file cache (issue 15 groundwork) over a million synthetic entries.

    .venv/bin/python benchmarks/filecache.py --files 1000000 --out docs/benchmarks.md

No real million-file tree here: paths and stat results are synthetic (made on the fly, never
held in a list, so memory is what the cache costs). Phases, each timed, with its peak RSS
(VmHWM, reset before each phase through ``/proc/self/clear_refs``):

- first run: every file a miss, recorded (``lookup`` + ``record``), then ``finish``;
- second run: every file a hit (``reuse``: lookup + rehash choice at 1%), then ``finish``;
- reopening the million-entry cache;

against baselines in the same run: the same statements on a bare ``sqlite3`` connection (one
``INSERT`` per file in transactions of the same size; one point ``SELECT`` per file): what
SQLite alone costs, our code's limit. For scale, ``os.stat`` per file on a real tree of
``--stat-files`` small files (what any walk pays, cache or not) and SHA-256 of the benchmark's
average upload (500 MB / 5,600 files, about 90 KB: what a hit saves, before even reading it).
Appends the results under "## File cache (issue 15 groundwork)" to ``--out`` (or prints them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from conexa_backup.filecache import DEFAULT_BATCH, FileCache, key_fingerprint

ROOT = Path("/srv/uploads")
BLOB = "ab" * 32
AVERAGE_UPLOAD = 500 * 1024 * 1024 // 5600


def entries(n: int) -> Iterator[tuple[str, os.stat_result]]:
    """``n`` synthetic (path, stat) pairs shaped like a school's uploads, made one at a time."""
    for i in range(n):
        path = f"{2000 + i % 25}/class{i % 300:03d}/student{i // 300:05d}/homework-{i}.pdf"
        st = os.stat_result(
            (0o100644, i, 1, 1, 0, 0, 1000 + i % 200_000, 0, 0, 0),
            {"st_mtime_ns": 10**18 + i, "st_ctime_ns": 10**18 + 2 * i, "st_atime_ns": 0},
        )
        yield path, st


def peak_reset() -> None:
    """Start a new high-water mark of this process's RSS (Linux 4.0 and later)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def phase(name: str, work: Callable[[], object]) -> tuple[str, float, float]:
    """Run ``work``; return its name, wall seconds and peak RSS (MB) during it."""
    peak_reset()
    start = time.perf_counter()
    work()
    return name, time.perf_counter() - start, peak_mb()


def first_run(state: Path, n: int) -> None:
    with FileCache.open(state, ROOT, key_fingerprint(b"bench")) as cache:
        for path, st in entries(n):
            if cache.lookup(path, st) is None:
                cache.record(path, st, [BLOB], BLOB)
        cache.finish()


def second_run(state: Path, n: int) -> None:
    with FileCache.open(state, ROOT, key_fingerprint(b"bench")) as cache:
        reused = sum(cache.reuse(path, st) is not None for path, st in entries(n))
        cache.finish()
    assert 0.98 * n <= reused < n, reused  # about 1% re-read


def reopen(state: Path) -> None:
    with FileCache.open(state, ROOT, key_fingerprint(b"bench")):
        pass


def bare_inserts(db_path: Path, n: int) -> None:
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE files (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
        "ctime_ns INTEGER, inode INTEGER, sha256 TEXT, blobs TEXT, seen INTEGER) WITHOUT ROWID"
    )
    db.execute("BEGIN")
    for i, (path, st) in enumerate(entries(n), 1):
        db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (path.encode(), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, BLOB, BLOB, 1),
        )
        if i % DEFAULT_BATCH == 0:
            db.execute("COMMIT")
            db.execute("BEGIN")
    db.execute("COMMIT")
    db.close()


def bare_selects(db_path: Path, n: int) -> None:
    db = sqlite3.connect(db_path, isolation_level=None)
    sql = "SELECT size, mtime_ns, ctime_ns, inode, blobs, sha256 FROM files WHERE path = ?"
    found = sum(db.execute(sql, (path.encode(),)).fetchone() is not None for path, _ in entries(n))
    db.close()
    assert found == n


def stat_per_file(folder: Path, count: int) -> float:
    """Seconds per ``os.stat`` over ``count`` real small files (made first, cached by the OS)."""
    folder.mkdir()
    names = [folder / f"f{i:06d}" for i in range(count)]
    for name in names:
        name.write_bytes(b"x")
    paths = [str(name) for name in names]  # a walker stats strings, not Path objects
    for path in paths:  # warm the dentry cache, as a walk that just listed them has
        os.stat(path)  # noqa: PTH116
    start = time.perf_counter()
    for path in paths:
        os.stat(path)  # noqa: PTH116
    return (time.perf_counter() - start) / count


def sha_per_file() -> float:
    data = os.urandom(AVERAGE_UPLOAD)
    start = time.perf_counter()
    for _ in range(200):
        hashlib.sha256(data).digest()
    return (time.perf_counter() - start) / 200


def report(n: int, rows: list[tuple[str, float, float]], extra: list[str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## File cache (issue 15 groundwork)",
        "",
        f"`.venv/bin/python benchmarks/filecache.py --files {n} --out docs/benchmarks.md`, "
        f"{when}, CPython {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} cores (shared with other work while it ran).",
        "",
        f"{n:,} synthetic entries (paths like `2003/class042/student01234/homework-N.pdf`, "
        "stat results made on the fly); peak RSS is the process's VmHWM during the phase "
        "(Python, the imports and SQLite included).",
        "",
        "| phase | time | per file | peak RSS |",
        "|---|---|---|---|",
    ]
    for name, seconds, peak in rows:
        per = f"{seconds / n * 1e6:.1f} µs" if "reopen" not in name else "-"
        lines.append(f"| {name} | {seconds:.2f} s | {per} | {peak:.0f} MB |")
    return "\n".join([*lines, "", *extra, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--stat-files", type=int, default=20_000)
    parser.add_argument("--out", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    n = args.files
    work = Path(tempfile.mkdtemp(prefix="bench-filecache-"))
    try:
        state, bare = work / "state", work / "bare.sqlite"
        rows = [
            phase("baseline: bare SQLite, one INSERT per file", lambda: bare_inserts(bare, n)),
            phase("first run: all misses, recorded", lambda: first_run(state, n)),
            phase(
                "baseline: bare SQLite, one point SELECT per file", lambda: bare_selects(bare, n)
            ),
            phase("second run: all hits (1% re-read chosen)", lambda: second_run(state, n)),
            phase("reopen the cache", lambda: reopen(state)),
        ]
        size = sum(p.stat().st_size for p in (state / "filecache").iterdir()) / 1e6
        stat_us = stat_per_file(work / "tree", args.stat_files) * 1e6
        sha_us = sha_per_file() * 1e6
        extra = [
            f"Cache file: {size:.0f} MB for {n:,} entries. For scale, per file: `os.stat` "
            f"{stat_us:.1f} µs (on {args.stat_files:,} real small files, warm), SHA-256 of the "
            f"benchmark's average upload ({AVERAGE_UPLOAD // 1024} KiB, in memory) "
            f"{sha_us:.0f} µs, before reading it from disk.",
        ]
        text = report(n, rows, extra)
    finally:
        shutil.rmtree(work)
    if args.out:
        with args.out.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
