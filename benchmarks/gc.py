"""Benchmark prune's garbage collection of packs (issue 15) at a million blobs.

    .venv/bin/python benchmarks/gc.py --blobs 1000000

Synthetic, no real packs: the cache (``state_dir/packs``) is filled with ``--blobs`` blob ids
in packs of 50,000 (the writer's ``MAX_BLOBS``), each pack a small placeholder file on a
local target, a day old. Two backups' refs cover the first three quarters of the blobs (half
each, overlapping), so the last quarter's packs are unreferenced. Phases, each timed with
the process's peak RSS (VmHWM, reset before each phase through ``/proc/self/clear_refs``):

- writing the two refs files (what each backup run, or a rebuild from an uploads index, pays);
- ``gc.collect`` as a dry run (merge the refs into the temporary table, judge every pack);
- ``gc.collect`` for real (the same, then delete the unreferenced packs).

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from conexa_backup.actions import gc
from conexa_backup.actions.context import Context
from conexa_backup.blobindex import BlobIndex
from conexa_backup.config import load_config
from conexa_backup.packs import MAX_BLOBS, pack_key

LENGTH = 10_000  # each blob's length: only shares matter


def blob(i: int) -> str:
    return hashlib.sha256(b"blob %d" % i).hexdigest()


def peak_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(label: str, rows: list[str], run: Callable[[], object]) -> object:
    peak_reset()
    start = time.perf_counter()
    result = run()
    rows.append(f"| {label} | {time.perf_counter() - start:.2f} s | {peak_mb():.0f} MB |")
    return result


def setup(root: Path, n: int) -> Context:
    config = root / "backup.toml"
    config.write_text(
        f'state_dir = "{root / "state"}"\n'
        '[database]\nurl = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'[uploads]\npath = "{root}"\nformat = "packs"\n'
        f'[[targets]]\nname = "local"\ntype = "local"\npath = "{root / "target"}"\n',
        encoding="utf-8")
    ctx = Context(load_config(config)[0])
    old = time.time() - 2 * 86400
    with BlobIndex.open(ctx.config.state_dir) as index:
        for j in range(0, n, MAX_BLOBS):
            name = hashlib.sha256(b"pack %d" % j).hexdigest()
            path = root / "target" / pack_key(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"placeholder")
            os.utime(path, (old, old))
            index.add_pack(name, ((blob(i), LENGTH) for i in range(j, min(n, j + MAX_BLOBS))),
                           [("local", 11)])
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blobs", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.blobs
    root = Path(tempfile.mkdtemp(prefix="gc-bench-"))
    rows = ["| phase | time | peak RSS |", "|---|---|---|"]
    try:
        ctx = setup(root, n)
        target = ctx.targets()[0]
        now = datetime.now(UTC)

        def ids(lo: int, hi: int) -> Iterator[str]:
            return (blob(i) for i in range(lo, hi))

        def refs() -> None:
            with BlobIndex.open(ctx.config.state_dir) as index:
                index.write_refs("a", ids(0, n // 2))
                index.write_refs("b", ids(n // 4, 3 * n // 4))

        def collect(dry_run: bool) -> gc.GcReport:
            with BlobIndex.open(ctx.config.state_dir) as index:
                return gc.collect(ctx, index, target, ["a", "b"], now=now, dry_run=dry_run)

        timed(f"write two backups' refs ({n // 2:,} ids each)", rows, refs)
        preview = timed("GC, dry run", rows, lambda: collect(True))
        done = timed("GC, deleting the unreferenced packs", rows, lambda: collect(False))
        assert isinstance(preview, gc.GcReport) and isinstance(done, gc.GcReport)
        assert done.deleted == preview.deleted and len(done.deleted) == (n // 4) // MAX_BLOBS
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{n:,} blobs in {-(-n // MAX_BLOBS)} packs, Python {sys.version.split()[0]}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
