"""Peak memory and time of the packs restore engine over N tiny files (issue 15).

    .venv/bin/python benchmarks/restore_packs.py --files 200000 --dir /var/tmp/rp

N files of 200 bytes each (the worst case for memory: a pack then holds the maximum
``packs.MAX_BLOBS`` blobs) are written as packs to a local target with an uploads index, in a
first child process; a second child restores them with an empty pack cache (the index into
SQLite, every pack read, blobs written, attributes set) and reports its wall time and peak RSS
(``ru_maxrss``). Children, so that what making the packs cost is not counted. ``--dir`` is
left in place (``--keep``) or removed.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make(root: Path, files: int) -> None:
    from conexa_backup import packs
    from conexa_backup.manifest import IndexEntry
    from conexa_backup.storage.local import LocalTarget, LocalTargetConfig

    scratch = root / "scratch"
    scratch.mkdir(mode=0o700, parents=True)
    target = LocalTarget(LocalTargetConfig(name="t", type="local", path=root / "target"))

    def upload(pack: packs.StoredPack) -> None:
        writer = target.writer(pack.key)
        writer.write(pack.path.read_bytes())
        writer.commit()

    with open(root / "index.jsonl", "wb") as out, packs.PackWriter(scratch, upload) as writer:
        out.write(IndexEntry(".", "dir", mode=0o755, mtime_ns=0).to_line())
        for folder in range(files // 1000 + 1):
            out.write(IndexEntry(f"d{folder:04d}", "dir", mode=0o755, mtime_ns=0).to_line())
        for i in range(files):
            found = packs.file_blobs(io.BytesIO(os.urandom(200)), on_piece=writer.add)
            out.write(IndexEntry(f"d{i // 1000:04d}/file-{i:07d}.bin", "file", found.size,
                                 found.sha256, mode=0o644, mtime_ns=10**18,
                                 blobs=tuple(found.blobs)).to_line())


def restore(root: Path) -> None:
    from conexa_backup.actions.restore_packs import (
        PackReading,
        _Tree,
        fetch_packs,
        lacking,
    )
    from conexa_backup.actions.uploads_index import Needs
    from conexa_backup.blobindex import BlobIndex
    from conexa_backup.storage.local import LocalTarget, LocalTargetConfig

    target = LocalTarget(LocalTargetConfig(name="t", type="local", path=root / "target"))
    dest = root / "restored"
    t0 = time.monotonic()
    with Needs(root / "scratch") as needs, BlobIndex(root / "cache") as index:
        with open(root / "index.jsonl", "rb") as fh:
            counts = needs.load(fh)
        dest.mkdir(mode=0o700)
        tree = _Tree(dest, needs)
        tree.create()
        reading = PackReading(target, index, root / "scratch", None, None)
        fetch_packs(reading, needs, tree.write)
        assert lacking(reading, needs, "bench") is None
        tree.finish()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{counts.files} files: restored in {time.monotonic() - t0:.1f} s, "
          f"peak RSS {peak:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--phase", choices=["make", "restore"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "make":
        make(args.dir, args.files)
        return
    if args.phase == "restore":
        restore(args.dir)
        return
    if args.dir.exists():
        sys.exit(f"{args.dir} exists")
    try:
        for phase in ("make", "restore"):
            subprocess.run([sys.executable, __file__, "--phase", phase, "--dir", str(args.dir),
                            "--files", str(args.files)], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
