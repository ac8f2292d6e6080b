"""Garbage collection of packs in ``prune`` (issue 15): what goes, when, and that no remaining
backup ever lacks a blob, even when GC is killed at any step."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard
from pyrage import decrypt

from conexa_backup import packs
from conexa_backup.manifest import IndexEntry, Manifest
from tests.conftest import Workspace
from tests.test_backup_packs import backup, packs_config, stored_packs
from tests.test_trust import AgeKey, encryption_toml, make_age_key

DAY = 86400
KEEP_LAST_1 = '[retention]\nkeep_last = 1\n'


# -- helpers --------------------------------------------------------------------------------------

def tree(ws: Workspace, files: dict[str, bytes]) -> None:
    """Make the uploads folder hold exactly ``files``."""
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir(parents=True)
    for name, data in files.items():
        (ws.uploads / name).write_bytes(data)


def blobs(prefix: str, n: int, size: int = 20_000) -> dict[str, bytes]:
    """``n`` files of random (incompressible) bytes: shares of content are shares of bytes."""
    return {f"{prefix}{i}.bin": os.urandom(size) for i in range(n)}


def age_packs(root: Path, seconds: int = 2 * DAY) -> None:
    """Make every pack on a local target look ``seconds`` old (the listing's modified time)."""
    when = time.time() - seconds
    for path in (root / "packs").rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def plain(data: bytes, key: AgeKey | None) -> bytes:
    if data.startswith(packs.AGE_MAGIC):
        assert key is not None
        from pyrage import x25519
        data = decrypt(data, [x25519.Identity.from_str(key.identity)])
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def present(root: Path, key: AgeKey | None = None, dedup: bytes | None = None) -> set[str]:
    """Every blob the packs on a local target really hold: each pack read and checked
    against its name, each blob against its id."""
    found: set[str] = set()
    ids = [key.identity] if key else None
    from pyrage import x25519
    idents = [x25519.Identity.from_str(i) for i in ids] if ids else None
    for name in stored_packs(root):
        with (root / packs.pack_key(name)).open("rb") as stored, \
                packs.open_pack(name, stored, root.parent, key=dedup, identities=idents) as rd:
            found.update(blob for blob, _ in rd.blobs())
    return found


def complete(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))


def named_blobs(root: Path, backup_id: str, key: AgeKey | None = None) -> set[str]:
    """The blob ids a backup's uploads index names."""
    manifest = Manifest.from_json((root / backup_id / "manifest.json").read_bytes(), "t")
    artifact = manifest.artifact("uploads-index")
    assert artifact is not None
    raw = plain((root / backup_id / artifact.name).read_bytes(), key)
    return {b for line in raw.splitlines() for b in IndexEntry.from_line(line).blobs or ()}


def assert_whole(root: Path, key: AgeKey | None = None, dedup: bytes | None = None) -> None:
    """Every listed-complete backup on a local target has every blob it names."""
    have = present(root, key, dedup)
    for backup_id in complete(root):
        missing = named_blobs(root, backup_id, key) - have
        assert not missing, f"backup {backup_id} lacks {len(missing)} blob(s)"


def prune(ws: Workspace, *args: str, code: int = 0) -> dict[str, Any]:
    """``prune --json`` on the only target: its entry."""
    result = ws.run("prune", "--json", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    entries = json.loads(result.stdout)
    return dict(entries[0])


# -- tests ----------------------------------------------------------------------------------------

def test_a_pruned_backups_pack_goes_only_after_the_grace_period(ws: Workspace) -> None:
    packs_config(ws, KEEP_LAST_1)
    tree(ws, blobs("old", 5))
    first = backup(ws)
    old = set(stored_packs(ws.backups))
    tree(ws, blobs("new", 5))
    second = backup(ws)
    entry = prune(ws)
    assert entry["deleted"] == [first] and complete(ws.backups) == [second]
    assert entry["gc"]["deleted_packs"] == [] and entry["gc"]["waiting_packs"] == len(old)
    assert old <= set(stored_packs(ws.backups))  # younger than 24 h: a run may want them
    age_packs(ws.backups, DAY - 600)
    assert prune(ws)["gc"]["deleted_packs"] == []
    age_packs(ws.backups, DAY + 60)
    entry = prune(ws)
    assert sorted(entry["gc"]["deleted_packs"]) == sorted(old)
    assert not old & set(stored_packs(ws.backups))
    assert_whole(ws.backups)
