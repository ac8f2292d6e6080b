"""Backups in the packs format (issue 15): what a run stores, and what the next one skips."""

from __future__ import annotations

import json
from pathlib import Path

from conexa_backup.blobindex import BlobIndex
from conexa_backup.manifest import IndexEntry, Manifest
from conexa_backup.packs import pack_name
from tests.conftest import Workspace

def packs_config(ws: Workspace, extra: str = "") -> None:
    ws.write_config(uploads=False, extra=f'[uploads]\npath = "{ws.uploads}"\nformat = "packs"\n'
                    + extra)


def backup(ws: Workspace, *args: str) -> str:
    result = ws.run("backup", "--json", "--no-prune", *args)
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["id"])


def stored_packs(root: Path) -> dict[str, int]:
    found = {}
    for path in (root / "packs").rglob("*"):
        if path.is_file() and (name := pack_name(str(path.relative_to(root)))):
            found[name] = path.stat().st_size
    return found


def index_of(ws: Workspace, backup_id: str) -> list[IndexEntry]:
    import zstandard

    raw = (ws.backups / backup_id / "uploads.index.jsonl.zst").read_bytes()
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return [IndexEntry.from_line(line) for line in plain.splitlines()]


def test_a_packs_backup_stores_packs_and_an_index_naming_every_blob(ws: Workspace) -> None:
    packs_config(ws)
    first = backup(ws)
    manifest = Manifest.from_json((ws.backups / first / "manifest.json").read_bytes(), "t")
    assert manifest.uploads is not None and manifest.uploads.format == "packs"
    assert manifest.artifact("uploads") is None and manifest.artifact("uploads-index")
    entries = index_of(ws, first)
    files = [e for e in entries if e.type == "file"]
    assert len(files) == manifest.uploads.files > 0
    assert entries[0].path == "." and entries[0].type == "dir"
    assert all(e.mtime_ns is not None and (e.mode is not None) == (e.type != "symlink")
               for e in entries)
    stored = stored_packs(ws.backups)
    assert stored
    with BlobIndex.open(ws.state) as index:
        for entry in files:
            for blob in entry.blobs or ():
                assert index.has("local", blob), entry.path


def test_an_unchanged_tree_stores_no_new_pack_and_reads_no_file(ws: Workspace) -> None:
    packs_config(ws, "rehash_share = 0\n")
    backup(ws)
    before = stored_packs(ws.backups)
    result = ws.run("backup", "--json", "--no-prune", "-v")
    assert result.returncode == 0, result.stderr
    assert stored_packs(ws.backups) == before
    line = next(ln for ln in result.stderr.splitlines() if "new blobs" in ln)
    assert "(0 read, 0 bytes), 0 new blobs (0 bytes) in 0 packs" in line, line
    result = ws.run("backup", "--json", "--no-prune", "-v", "--rehash")
    line = next(ln for ln in result.stderr.splitlines() if "new blobs" in ln)
    assert "0 new blobs (0 bytes) in 0 packs" in line and "(0 read" not in line, line


def test_a_new_file_is_the_only_thing_stored_next_time(ws: Workspace) -> None:
    packs_config(ws)
    backup(ws)
    before = stored_packs(ws.backups)
    (ws.uploads / "new.bin").write_bytes(b"fresh bytes" * 1000)
    second = backup(ws)
    added = stored_packs(ws.backups).keys() - before.keys()
    assert len(added) == 1
    new = next(e for e in index_of(ws, second) if e.path == "new.bin")
    with BlobIndex.open(ws.state) as index:
        assert index.pack_blobs(added.pop()) == [(new.blobs[0], 11000)]  # type: ignore[index]
