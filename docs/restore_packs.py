#!/usr/bin/env python3
"""Rebuild an uploads tree from a packs-format backup, by hand, with Python's stdlib only.

    python3 restore_packs.py UPLOADS_INDEX PACKS_DIR DEST

UPLOADS_INDEX: the backup's uploads index, decompressed (JSON lines, one entry each:
``path``, ``type`` (file, dir, symlink), ``mode``, ``uid``, ``gid``, ``mtime_ns``; files also
``size``, ``sha256`` and ``blobs``, the ids of their pieces in order; symlinks ``target``).
A newer backup stores the index itself in the packs: its ``uploads.index.jsonl`` then lists
the pieces (``chunk``: a blob id, ``size``, ``sha256``), which are joined, in order, first.
PACKS_DIR: the packs, each already ``age -d`` (when encrypted) and ``zstd -d``, under any
names. DEST: a folder that does not exist yet (or is empty).

Every file's SHA-256 is checked; folders and files get their modes and mtimes (and owners
when run as root); symlinks are made last, so nothing is written through one. Absolute paths
and ``..`` are refused. See docs/packs.md, "By hand".
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import sys
from pathlib import Path, PurePosixPath

TRAILER = struct.Struct("<Q8s")  # index length, little-endian; then the magic
MAGIC = b"CXBPACK1"


def pack_indexes(folder: Path) -> dict[str, tuple[Path, int, int]]:
    """blob id -> (pack file, offset, length), from every pack's own index."""
    where: dict[str, tuple[Path, int, int]] = {}
    for pack in sorted(folder.iterdir()):
        with pack.open("rb") as fh:
            total = fh.seek(0, os.SEEK_END)
            if total < TRAILER.size:
                sys.exit(f"{pack}: not a decompressed pack")
            fh.seek(total - TRAILER.size)
            length, magic = TRAILER.unpack(fh.read(TRAILER.size))
            if magic != MAGIC:
                sys.exit(f"{pack}: not a decompressed pack (run age -d and zstd -d first)")
            fh.seek(total - TRAILER.size - length)
            for blob, offset, size in json.loads(fh.read(length))["blobs"]:
                where[blob] = (pack, offset, size)
    return where


def safe(path: str) -> Path:
    """``path`` as a relative path inside DEST (``.``: DEST itself); exits on an absolute
    path or ``..``."""
    parts = PurePosixPath(path).parts
    if (not parts and path != ".") or path.startswith("/") or ".." in parts:
        sys.exit(f"refused: unsafe path {path!r} in the index")
    return Path(*parts)


def write_file(dest: Path, entry: dict, where: dict[str, tuple[Path, int, int]]) -> None:
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        for blob in entry.get("blobs", []):
            if blob not in where:
                sys.exit(f"{entry['path']}: blob {blob} is in no pack")
            data = read_blob(where, blob)
            digest.update(data)
            out.write(data)
    if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
        sys.exit(f"{entry['path']}: SHA-256 does not match the index: damaged")


def finish(path: Path, entry: dict) -> None:
    """Owner (as root), mode and mtime, never following a symlink."""
    link = entry["type"] == "symlink"
    if os.geteuid() == 0 and "uid" in entry:
        os.chown(path, entry["uid"], entry["gid"], follow_symlinks=False)
    if not link:
        path.chmod(stat.S_IMODE(entry["mode"]))
    if "mtime_ns" in entry:
        os.utime(path, ns=(entry["mtime_ns"], entry["mtime_ns"]), follow_symlinks=False)


def read_blob(where: dict[str, tuple[Path, int, int]], blob: str) -> bytes:
    if blob not in where:
        sys.exit(f"blob {blob} is in no pack")
    pack, offset, size = where[blob]
    with pack.open("rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def index_lines(index: Path, where: dict[str, tuple[Path, int, int]]) -> list[bytes]:
    """The index's lines: the file's own, or, when it lists pieces, theirs joined."""
    lines = [line for line in index.open("rb") if line.strip()]
    if not lines or "chunk" not in json.loads(lines[0]):
        return lines
    whole = bytearray()
    for line in lines:
        piece = json.loads(line)
        data = read_blob(where, piece["chunk"])
        if len(data) != piece["size"] or hashlib.sha256(data).hexdigest() != piece["sha256"]:
            sys.exit(f"index piece {piece['chunk']}: SHA-256 does not match: damaged")
        whole += data
    return [line for line in bytes(whole).splitlines() if line.strip()]


def main(index: Path, packs: Path, dest: Path) -> None:
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(dest.iterdir()):
        sys.exit(f"{dest} is not empty")
    where = pack_indexes(packs)
    entries = [json.loads(line) for line in index_lines(index, where)]
    for entry in entries:  # folders and files; parents made as needed, owner-only for now
        path = dest / safe(entry["path"])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if entry["type"] == "dir":
            path.mkdir(mode=0o700, exist_ok=True)
        elif entry["type"] == "file":
            write_file(path, entry, where)
            finish(path, entry)
        elif entry["type"] != "symlink":
            sys.exit(f"{entry['path']}: unknown type {entry['type']!r}")
    for entry in entries:  # links last: nothing above was written through one
        if entry["type"] == "symlink":
            path = dest / safe(entry["path"])
            if path.exists() or path.is_symlink():
                sys.exit(f"refused: {entry['path']} is a link and also holds other entries")
            path.symlink_to(entry["target"])
            finish(path, entry)
    # Folders last (writing inside one changes its mtime), deepest first (a folder without
    # search permission for a user other than root would hide its children).
    folders = [e for e in entries if e["type"] == "dir"]
    for entry in sorted(folders, key=lambda e: -len(safe(e["path"]).parts)):
        finish(dest / safe(entry["path"]), entry)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
