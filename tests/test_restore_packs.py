"""Packs-format backups restore, drill, verify and download as tar-format ones do (issue 15).

Round trips on local, S3 (moto) and GCS (fake-gcs) targets; a fresh restore host (empty pack
cache); encryption (age + dedup key); a target that lost or damaged a pack (verify and drill
name the backup and files, restore falls back to another copy); hostile indexes; the by-hand
script on a real packs backup's download.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import BinaryIO

import pytest
import zstandard

from conexa_backup import packs
from conexa_backup.actions.restore_packs import (
    PackReading,
    _Tree,
    _Writing,
    fetch_packs,
    lacking,
)
from conexa_backup.actions.uploads_index import Needs
from conexa_backup.blobindex import BlobIndex
from conexa_backup.config import CompressionConfig
from conexa_backup.errors import IntegrityError, ObjectNotFoundError, UnsafeArchiveError
from conexa_backup.manifest import IndexEntry
from conexa_backup.storage.base import ObjectInfo
from conexa_backup.storage.local import LocalTarget, LocalTargetConfig
from conexa_backup.testing.compare import tree_snapshot
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.conftest import Workspace
from tests.test_backup_packs import (
    backup,
    index_bytes,
    index_of,
    index_pieces,
    packs_config,
    stored_packs,
)
from tests.test_copies import cloud_targets
from tests.test_failures import listed_by_id
from tests.test_trust import make_age_key, toml_str

SCRIPT = Path(__file__).parent.parent / "docs" / "restore_packs.py"
INDEX = "uploads.index.jsonl.zst"


def restore_to(ws: Workspace, backup_id: str, to: Path,
               *args: str) -> subprocess.CompletedProcess[str]:
    return ws.run("restore", backup_id, "--only", "uploads", "--uploads-to", str(to), "--yes",
                  *args)


def awkward_tree(root: Path) -> None:
    """What a restore must bring back beside the sample tree: a name that is not UTF-8, an
    empty folder with its own mode, a file of a few MiB, a file owned by someone else, a
    set-id bit (never restored), a link pointing out of the tree, nanosecond mtimes."""
    latin = root / os.fsdecode(b"r\xe9sum\xe9s")
    latin.mkdir()
    (latin / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name")
    (root / "vazia").mkdir(mode=0o750)
    (root / "grande.bin").write_bytes(os.urandom(3 << 20))
    owned = root / "owned.txt"
    owned.write_bytes(b"owned by 1234")
    os.chown(owned, 1234, 4321)
    setuid = root / "setuid.sh"
    setuid.write_bytes(b"#!/bin/sh\n")
    setuid.chmod(0o4755)
    (root / "fora").symlink_to("/etc/hostname")
    os.utime(root / "grande.bin", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    os.utime(root / "vazia", ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))


def expected(ws: Workspace) -> dict[str, object]:
    """The tree as a restore must make it: set-id bits dropped (as for a tar)."""
    snap = tree_snapshot(ws.uploads)
    kind, mode, *rest = snap["setuid.sh"]
    snap["setuid.sh"] = (kind, mode & ~0o6000, *rest)
    return snap  # type: ignore[return-value]


def check_restored(ws: Workspace, restored: Path) -> None:
    assert tree_snapshot(restored) == expected(ws)
    assert (restored / "grande.bin").stat().st_mtime_ns == 1_700_000_000_123_456_789
    assert (restored / "vazia").stat().st_mtime_ns == 1_600_000_000_000_000_001
    owned = (restored / "owned.txt").stat()
    assert (owned.st_uid, owned.st_gid) == (1234, 4321)
    assert str((restored / "fora").readlink()) == "/etc/hostname"


def test_a_packs_backup_restores_equal_and_drills(ws: Workspace, tmp_path: Path) -> None:
    awkward_tree(ws.uploads)
    packs_config(ws)
    backup_id = backup(ws)
    restored = tmp_path / "restored"
    result = restore_to(ws, backup_id, restored)
    assert result.returncode == 0, result.stderr
    check_restored(ws, restored)
    assert b"r\xe9sum\xe9s" in os.listdir(os.fsencode(restored))  # the same bytes
    assert not list((ws.state / "staging").iterdir())  # no scratch left behind
    drill = ws.run("verify", "--drill", backup_id, "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    steps = {s["name"]: s for s in json.loads(drill.stdout)["drills"][0]["steps"]}
    assert "every blob against its id" in steps["fetch and extract uploads"]["detail"]
    assert steps["uploads files"]["detail"].startswith("SHA-256 of every file matches")
    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_restore_in_place_of_the_live_folder(ws: Workspace) -> None:
    packs_config(ws)
    backup_id = backup(ws)
    before = tree_snapshot(ws.uploads)
    shutil.rmtree(ws.uploads / "fotos")
    result = ws.run("restore", backup_id, "--only", "uploads", "--yes", "--no-safety-backup")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(ws.uploads) == before


def test_a_fresh_host_with_an_empty_cache_restores_and_learns_the_packs(
        ws: Workspace, tmp_path: Path) -> None:
    packs_config(ws)
    backup_id = backup(ws)
    shutil.rmtree(ws.state)  # a new host: no pack cache, no file cache
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(tmp_path / "r") == tree_snapshot(ws.uploads)
    with BlobIndex.open(ws.state) as index:  # each pack read once, and recorded
        assert {p.name for p in index.held("local")} == stored_packs(ws.backups).keys()


def test_a_fresh_host_restoring_an_older_backup_reads_packs_it_does_not_need(
        ws: Workspace, tmp_path: Path) -> None:
    """Packs unknown to the cache are read to learn what they hold: one holding nothing the
    backup needs (a later backup's) is learnt, and nothing of it is written."""
    packs_config(ws)
    older = tree_snapshot(ws.uploads)
    first = backup(ws)
    (ws.uploads / "later.bin").write_bytes(os.urandom(5000))
    backup(ws)
    shutil.rmtree(ws.state)
    result = restore_to(ws, first, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(tmp_path / "r") == older
    with BlobIndex.open(ws.state) as index:
        assert {p.name for p in index.held("local")} == stored_packs(ws.backups).keys()


def test_packs_on_s3_and_gcs_restore_equal(ws: Workspace, s3_server: S3Server,
                                          gcs_server: GCSServer, tmp_path: Path) -> None:
    awkward_tree(ws.uploads)
    packs_config(ws, cloud_targets(s3_server.endpoint))
    backup_id = backup(ws)
    for source in ("s3", "gcs"):
        shutil.rmtree(ws.state)  # every pack read from the cloud, none known
        result = restore_to(ws, backup_id, tmp_path / source, "--from", source)
        assert result.returncode == 0, result.stderr
        check_restored(ws, tmp_path / source)
    drill = ws.run("verify", "--drill", backup_id, "--from", "gcs", "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr


def encryption(tmp_path: Path, *, identity: bool = True) -> str:
    age = make_age_key(tmp_path / "keys" / "age.txt")
    dedup = tmp_path / "keys" / "dedup.key"
    dedup.write_text(os.urandom(32).hex() + "\n")
    dedup.chmod(0o600)
    return (f"[encryption]\nrecipients = [{toml_str(age.recipient)}]\n"
            + (f"identity_file = {toml_str(age.file)}\n" if identity else "")
            + f"dedup_key_file = {toml_str(dedup)}\n")


def test_an_encrypted_packs_backup_restores_equal(ws: Workspace, tmp_path: Path) -> None:
    awkward_tree(ws.uploads)
    packs_config(ws, encryption(tmp_path))
    backup_id = backup(ws)
    stored = b"".join(p.read_bytes() for p in (ws.backups / "packs").rglob("*") if p.is_file())
    assert b"latin-1 name" not in stored  # encrypted at rest
    shutil.rmtree(ws.state)  # the packs are read (decrypted) to learn what they hold
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    check_restored(ws, tmp_path / "r")
    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_another_dedup_key_is_refused_as_unusable_not_damage(ws: Workspace,
                                                             tmp_path: Path) -> None:
    packs_config(ws, encryption(tmp_path))
    backup_id = backup(ws)
    (tmp_path / "keys" / "dedup.key").write_text(os.urandom(32).hex() + "\n")
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode != 0
    # Said from the manifest's key_id, before any pack is downloaded.
    assert f"target 'local': backup {backup_id}: blob ids are keyed with dedup key" \
        in result.stderr and "Traceback" not in result.stderr, result.stderr
    damaged = ws.state / "damaged.json"
    assert not damaged.exists() or backup_id not in damaged.read_text()


def test_a_backup_host_without_identity_checks_the_packs_stored_bytes(
        ws: Workspace, tmp_path: Path) -> None:
    packs_config(ws, encryption(tmp_path, identity=False))  # recipients only
    backup_id = backup(ws)
    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (check,) = json.loads(verify.stdout)["checks"]
    assert "packs checked against their names only" in " ".join(check["problems"]), check
    name = sorted(stored_packs(ws.backups))[0]
    flip(ws.backups / packs.pack_key(name))
    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode != 0
    (check,) = json.loads(verify.stdout)["checks"]
    problem = " ".join(check["problems"])
    assert f"backup {backup_id}" in problem and f"pack {name}: stored bytes do not match" \
        in problem, problem


# -- a target that lost or damaged a pack -----------------------------------------------------

def two_targets(ws: Workspace) -> Path:
    other = ws.root / "other"
    packs_config(ws, f'[[targets]]\nname = "other"\ntype = "local"\npath = "{other}"\n')
    return other


def pack_and_files(ws: Workspace, backup_id: str) -> tuple[Path, list[str]]:
    """A pack on ``local`` holding some of the backup's files' blobs but none of its index's
    pieces, and the files they belong to."""
    pieces = {p["chunk"] for p in index_pieces(ws.backups, backup_id)}
    with BlobIndex.open(ws.state) as index:
        name, held = next((name, held) for name in sorted(stored_packs(ws.backups))
                          if not (held := {b for b, _ in index.pack_blobs(name)}) & pieces)
    files = [e.path for e in index_of(ws, backup_id) if e.type == "file"
             and held & set(e.blobs or ())]
    assert files
    return ws.backups / packs.pack_key(name), files


def index_packs(ws: Workspace, backup_id: str, new_since: str | None = None) -> set[Path]:
    """The packs on ``local`` holding the pieces of the backup's uploads index (those not
    pieces of backup ``new_since`` too, if given)."""
    pieces = {p["chunk"] for p in index_pieces(ws.backups, backup_id)}
    if new_since is not None:
        pieces -= {p["chunk"] for p in index_pieces(ws.backups, new_since)}
    with BlobIndex.open(ws.state) as index:
        names = {name for piece in pieces for name in index.packs_with(piece)}
    return {ws.backups / packs.pack_key(name) for name in names}


def harm_pack(pack: Path, harm: str) -> str:
    """Delete (``lost``) or flip a byte of (``flipped``) a stored pack; what the damage
    will be said as."""
    if harm == "lost":
        pack.unlink()
        return "is not on target 'local'"
    flip(pack)
    return "stored bytes do not match"


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm", ["lost", "flipped"])
def test_a_target_missing_or_damaging_a_pack(ws: Workspace, tmp_path: Path, harm: str) -> None:
    two_targets(ws)
    backup(ws)
    (ws.uploads / "novo.pdf").write_bytes(b"new since")
    for path in (ws.uploads, *ws.uploads.rglob("*")):  # every line of the index changes
        os.utime(path, ns=(10**18, 10**18), follow_symlinks=False)
    backup_id = backup(ws)  # so its pieces are in a pack of their own, beside novo.pdf
    pack, files = pack_and_files(ws, backup_id)
    why = harm_pack(pack, harm)

    # Local first (config order): it lacks blobs, so the other copy is used, and the damage
    # is recorded for status, list and prune.
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert "used the copy on 'other'" in result.stderr and files[0] in result.stderr
    assert tree_snapshot(tmp_path / "r") == tree_snapshot(ws.uploads)
    damaged = (ws.state / "damaged.json").read_text()
    assert backup_id in damaged and json.dumps(files[0])[1:-1] in damaged

    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode != 0, verify.stdout
    checks = {c["target"]: c for c in json.loads(verify.stdout)["checks"]}
    assert checks["other"]["ok"], checks["other"]
    problem = " ".join(checks["local"]["problems"])
    assert f"backup {backup_id}" in problem and pack.name in problem and why in problem
    assert files[0] in problem, problem

    drill = ws.run("verify", "--drill", backup_id, "--from", "local", "--json")
    assert drill.returncode != 0
    steps = {s["name"]: s for s in json.loads(drill.stdout)["drills"][0]["steps"]}
    step = steps["fetch and extract uploads"]
    assert not step["ok"] and step["damage"] and files[0] in step["detail"], step
    assert f"backup {backup_id}" in step["detail"] and pack.name in step["detail"], step


@pytest.mark.parametrize("harm", ["lost", "flipped"])
def test_a_target_missing_or_damaging_the_pack_of_the_index(ws: Workspace, tmp_path: Path,
                                                           harm: str) -> None:
    """The index's pieces are blobs too: a copy whose pack of them is gone or damaged is
    damaged, said so, and the other copy is used."""
    two_targets(ws)
    backup_id = backup(ws)
    (pack,) = index_packs(ws, backup_id)  # a small tree: one pack
    why = harm_pack(pack, harm)
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert "used the copy on 'other'" in result.stderr and "its uploads index" in result.stderr
    assert tree_snapshot(tmp_path / "r") == tree_snapshot(ws.uploads)
    assert backup_id in (ws.state / "damaged.json").read_text()

    verify = ws.run("verify", backup_id, "--json")
    assert verify.returncode != 0, verify.stdout
    checks = {c["target"]: c for c in json.loads(verify.stdout)["checks"]}
    assert checks["other"]["ok"], checks["other"]
    problem = " ".join(checks["local"]["problems"])
    assert f"backup {backup_id}" in problem and "its uploads index" in problem, problem
    assert pack.name in problem and why in problem, problem
    assert listed_by_id(ws)[backup_id]["targets"] == ["other"]  # the damage is said


KILLED_READING = """
import os, signal, sys
from pathlib import Path
from conexa_backup.actions.context import Context
from conexa_backup.actions.restore_packs import read_index
from conexa_backup.config import load_config

ctx = Context(load_config(Path(sys.argv[1]))[0])
(backup,) = ctx.scan(ctx.targets())
(copy,) = backup.copies
def die(plain):
    print(os.listdir(ctx.state_dir("staging")), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a run killed while it reads the index
read_index(ctx, copy, backup.id, copy.manifest, die)
"""


def test_a_run_killed_while_it_reads_the_index_leaves_it_to_the_next_sweep(
        ws: Workspace) -> None:
    """The pieces are joined in ``state_dir/staging`` (in plaintext, for an encrypted
    backup): under a scratch name, so the next run's sweep removes what a killed run left."""
    packs_config(ws)
    backup(ws)
    killed = subprocess.run([sys.executable, "-c", KILLED_READING, str(ws.config)],
                            capture_output=True, text=True, check=False, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    staging = ws.state / "staging"
    left = [p for p in staging.iterdir() if p.name.startswith("index-")]
    assert len(left) == 1 and (left[0] / "uploads.index.jsonl").stat().st_size > 0
    assert left[0].name in killed.stdout
    backup(ws)  # the next run that takes the lock sweeps first
    assert not left[0].exists()


def test_a_backup_with_its_index_stored_whole_restores_verifies_and_drills(
        ws: Workspace, tmp_path: Path) -> None:
    """Backups made before the index was stored in pieces keep working: the artifact is the
    index itself (``uploads.index = "lines"``)."""
    packs_config(ws)
    backup_id = backup(ws)
    rewrite_index(ws, backup_id, lambda lines: lines)
    shutil.rmtree(ws.state)  # and on a fresh host, which must read the index to know refs
    result = restore_to(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(tmp_path / "r") == tree_snapshot(ws.uploads)
    for args in (("verify", backup_id), ("verify", "--drill", backup_id)):
        run = ws.run(*args, "--json")
        assert run.returncode == 0, run.stdout + run.stderr


def test_verify_all_reads_each_pack_once_per_target(ws: Workspace) -> None:
    packs_config(ws)
    backup(ws)
    (ws.uploads / "new.bin").write_bytes(os.urandom(5000))
    backup(ws)
    shutil.rmtree(ws.state)  # nothing known: every pack is read by this verify
    verify = ws.run("verify", "--all", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checks = json.loads(verify.stdout)["checks"]
    artifacts = sum(p.stat().st_size for p in ws.backups.glob("2*/*")
                    if p.name != "manifest.json")
    stored = stored_packs(ws.backups)
    # With nothing known, the first index's read reads every pack once. A later backup's
    # pieces that an earlier one had too come from the run's cache of pieces; its new ones
    # are read again from their pack (they must be written out, not only checked).
    assert [c["id"] for c in checks] == sorted(c["id"] for c in checks)
    again = sum(stored[pack.name] for before, c in itertools.pairwise(checks)
                for pack in index_packs(ws, c["id"], new_since=before["id"]))
    assert sum(c["bytes_read"] for c in checks) == artifacts + sum(stored.values()) + again


def test_verify_all_reads_pieces_shared_by_backups_once(ws: Workspace) -> None:
    """Backups of an unchanged tree share their index's piece: verify --all reads it, and
    the pack holding it, once (the run keeps the pieces it read, by target)."""
    packs_config(ws)
    ids = [backup(ws) for _ in range(3)]
    assert len({json.dumps(index_pieces(ws.backups, i)) for i in ids}) == 1
    (pack,) = stored_packs(ws.backups).values()
    verify = ws.run("verify", "--all", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checks = json.loads(verify.stdout)["checks"]
    artifacts = sum(p.stat().st_size for p in ws.backups.glob("2*/*")
                    if p.name != "manifest.json")
    assert sum(c["bytes_read"] for c in checks) == artifacts + pack


# -- hostile indexes ---------------------------------------------------------------------------

def rewrite_index(ws: Workspace, backup_id: str,
                  change: Callable[[list[bytes]], list[bytes]]) -> None:
    """Replace a backup's uploads index, its manifest updated to match (as an attacker who
    can write the target, and no signing key configured, could). The index is written whole
    (``uploads.index = "lines"``, as backups before the index was stored in pieces)."""
    lines = index_bytes(ws.backups, backup_id)
    data = zstandard.ZstdCompressor().compress(b"".join(change(lines.splitlines(True))))
    (ws.backups / backup_id / INDEX).write_bytes(data)
    manifest_path = ws.backups / backup_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for artifact in manifest["artifacts"]:
        if artifact["kind"] == "uploads-index":
            artifact["size"], artifact["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    manifest["uploads"]["index"] = "lines"
    manifest_path.write_text(json.dumps(manifest))


def _line(**fields: object) -> bytes:
    return json.dumps({"uid": 0, "gid": 0, "mtime_ns": 0, **fields}).encode() + b"\n"


EMPTY = hashlib.sha256(b"").hexdigest()
HOSTILE = {
    "dotdot": [_line(path="../escaped", type="file", mode=0o644, size=0, sha256=EMPTY,
                     blobs=[])],
    "absolute": [_line(path="{outside}/escaped", type="file", mode=0o644, size=0,
                       sha256=EMPTY, blobs=[])],
    # the file first, the link after it: the check does not depend on the index's order
    "through a link": [_line(path="evil/escaped", type="file", mode=0o644, size=0,
                             sha256=EMPTY, blobs=[]),
                       _line(path="evil", type="symlink", target="{outside}")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_index_is_refused(ws: Workspace, tmp_path: Path, case: str) -> None:
    packs_config(ws)
    backup_id = backup(ws)
    outside = tmp_path / "outside"
    outside.mkdir()
    added = [line.replace(b"{outside}", str(outside).encode()) for line in HOSTILE[case]]
    rewrite_index(ws, backup_id, lambda lines: lines + added)
    dest = tmp_path / "dest" / "r"
    result = restore_to(ws, backup_id, dest)
    assert result.returncode != 0
    assert "refusing index entry" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (outside / "escaped").exists() and not (tmp_path / "dest" / "escaped").exists()
    assert not dest.exists() and os.listdir(tmp_path / "dest") == []  # staging removed


# -- pieces -------------------------------------------------------------------------------------

def test_pieces_land_at_their_offsets_in_every_file_that_holds_them(tmp_path: Path) -> None:
    """Piece logic with a small piece size (a 16 MiB piece is too costly here): a file of
    several pieces, a piece repeated inside one file and across files, a file of exactly two
    pieces, an empty file; packs of one piece each, so a file's pieces come from several."""
    piece = 1000
    same = os.urandom(piece)
    contents = {"multi.bin": os.urandom(3 * piece + 500), "twice.bin": same + same,
                "exact.bin": os.urandom(2 * piece), "also.bin": same, "empty.bin": b""}
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    target = LocalTarget(LocalTargetConfig(name="t", type="local", path=tmp_path / "target"))

    def upload(pack: packs.StoredPack) -> None:
        writer = target.writer(pack.key)
        writer.write(pack.path.read_bytes())
        writer.commit()

    lines = [IndexEntry(".", "dir", mode=0o755, mtime_ns=0).to_line()]
    with packs.PackWriter(scratch, upload, pack_size=piece) as writer:
        for name, data in contents.items():
            found = packs.file_blobs(io.BytesIO(data), piece_size=piece, on_piece=writer.add)
            lines.append(IndexEntry(name, "file", found.size, found.sha256, mode=0o640,
                                    mtime_ns=10**18, blobs=tuple(found.blobs)).to_line())
    assert len(writer.packs) >= 5
    root = tmp_path / "root"
    with Needs(scratch, piece_size=piece) as needs, BlobIndex(tmp_path / "cache") as index:
        needs.load(io.BytesIO(b"".join(lines)))
        root.mkdir(mode=0o700)
        tree = _Tree(root, needs)
        tree.create()
        reading = PackReading(target, index, scratch, None, None)
        fetch_packs(reading, needs, tree)
        assert lacking(reading, needs, "b") is None
        tree.finish()
    for name, data in contents.items():
        assert (root / name).read_bytes() == data, name
        assert (root / name).stat().st_mode & 0o7777 == 0o640
    assert list(scratch.iterdir()) == []


class _Repacking(LocalTarget):
    """A target a prune repacks while a restore reads it: the first listing shows only the
    old pack, which is gone when opened; the new one holding the same blobs shows next."""

    def __init__(self, root: Path, old: str, new: str) -> None:
        super().__init__(LocalTargetConfig(name="t", type="local", path=root))
        self.old, self.new, self.listings = old, new, 0

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self.listings += 1
        hidden = self.new if self.listings == 1 else self.old
        return (o for o in super().list(prefix) if not o.key.endswith(hidden))

    def open(self, key: str) -> BinaryIO:
        if key.endswith(self.old):
            raise ObjectNotFoundError(self.name, f"{key}: no such object")
        return super().open(key)


def test_a_pack_repacked_while_it_is_read_is_found_again(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    data = os.urandom(5000)
    names = []
    for level in (1, 9):  # the same blob in two packs of different bytes (names)
        written: list[packs.StoredPack] = []

        def upload(pack: packs.StoredPack, into: list[packs.StoredPack] = written) -> None:
            target = tmp_path / "target" / packs.pack_key(pack.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(pack.path, target)
            into.append(pack)

        with packs.PackWriter(scratch, upload,
                              compression=CompressionConfig(level=level)) as writer:
            found = packs.file_blobs(io.BytesIO(data), on_piece=writer.add)
        names.append(written[0].name)
    assert names[0] != names[1]
    target = _Repacking(tmp_path / "target", *names)
    line = IndexEntry("f", "file", found.size, found.sha256, blobs=tuple(found.blobs))
    root = tmp_path / "root"
    with Needs(scratch) as needs, BlobIndex(tmp_path / "cache") as index:
        needs.load(io.BytesIO(line.to_line()))
        root.mkdir()
        tree = _Tree(root, needs)
        tree.create()
        reading = PackReading(target, index, scratch, None, None)
        fetch_packs(reading, needs, tree)
        assert lacking(reading, needs, "b") is None and target.listings == 2
    assert (root / "f").read_bytes() == data


def test_an_index_whose_blobs_do_not_fit_the_size_is_refused(tmp_path: Path) -> None:
    line = IndexEntry("a", "file", 5000, EMPTY, blobs=("00" * 32,)).to_line()
    with Needs(tmp_path, piece_size=1000) as needs, \
            pytest.raises(Exception, match="1 blobs for 5000 bytes"):
        needs.load(io.BytesIO(line))
    twice = IndexEntry("a", "dir").to_line() + IndexEntry("a/", "dir").to_line()
    with Needs(tmp_path) as needs, pytest.raises(UnsafeArchiveError, match="stored twice"):
        needs.load(io.BytesIO(twice))
    assert list(tmp_path.iterdir()) == []


# -- download and the by-hand script -----------------------------------------------------------

def test_download_holds_what_the_by_hand_script_needs(ws: Workspace, tmp_path: Path) -> None:
    awkward_tree(ws.uploads)
    packs_config(ws)
    backup_id = backup(ws)
    (ws.uploads / "later.bin").write_bytes(os.urandom(3000))
    backup(ws)  # a pack the first backup does not need
    result = ws.run("download", backup_id, "--to", str(tmp_path / "dl"))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    saved = [p for p in (folder / "packs").rglob("*") if p.is_file()]
    assert saved and len(saved) < len(stored_packs(ws.backups))
    for path in saved:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        assert path.parent.name == path.name[:2] and path.stat().st_mode & 0o777 == 0o600
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in saved:
        subprocess.run(["zstd", "-q", "-d", str(path), "-o", str(plain / path.name)],
                       check=True)
    subprocess.run(["zstd", "-q", "-d", str(folder / INDEX), "-o",
                    str(tmp_path / "index.jsonl")], check=True)
    restored = tmp_path / "by-hand"
    script = subprocess.run(["/usr/bin/python3", str(SCRIPT), str(tmp_path / "index.jsonl"),
                             str(plain), str(restored)], capture_output=True, text=True,
                            check=False)
    assert script.returncode == 0, script.stderr
    snap = tree_snapshot(ws.uploads)  # the script keeps set-id bits: it restores modes as stored
    del snap["later.bin"]
    assert tree_snapshot(restored) == snap


def test_a_drill_hashes_a_sample_and_finds_a_missing_folder(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from conexa_backup.actions import restore_uploads

    awkward_tree(ws.uploads)
    packs_config(ws, "[drill]\nuploads_sample = 5\n")
    backup_id = backup(ws)
    files = sum(1 for e in index_of(ws, backup_id) if e.type == "file")
    extract = restore_uploads.extract

    def losing_a_folder(*args: object, **kwargs: object) -> Path:
        folder = extract(*args, **kwargs)  # type: ignore[arg-type]
        (folder / "vazia").rmdir()  # an empty folder: counts and bytes do not see it
        return folder

    monkeypatch.setattr(restore_uploads, "extract", losing_a_folder)
    result = ws.cli("verify", "--drill", backup_id, "--json")
    report = json.loads(result.stdout)  # type: ignore[attr-defined]
    step = next(s for s in report["drills"][0]["steps"] if s["name"] == "uploads files")
    assert not step["ok"] and "missing folder vazia" in step["detail"], step
    monkeypatch.setattr(restore_uploads, "extract", extract)
    result = ws.cli("verify", "--drill", backup_id, "--json")
    report = json.loads(result.stdout)  # type: ignore[attr-defined]
    step = next(s for s in report["drills"][0]["steps"] if s["name"] == "uploads files")
    assert step["ok"] and f"a sample of 5 of {files}" in step["detail"], step


def test_a_blob_that_fails_its_check_names_the_pack_and_the_others_are_written(
        tmp_path: Path) -> None:
    """The writers check each blob against its id: one that does not match raises once every
    other write of the pack has ended, and only the good ones count as found."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    blobs = {f"f{i}": os.urandom(3000 + i) for i in range(5)}
    stored: list[packs.StoredPack] = []
    kept = tmp_path / "stored"

    def upload(pack: packs.StoredPack) -> None:
        shutil.copyfile(pack.path, kept)
        stored.append(pack)

    with packs.PackWriter(scratch, upload) as writer:
        for data in blobs.values():
            writer.add(packs.blob_id(data), data)
    (pack,) = stored
    lines = [IndexEntry(".", "dir").to_line()] + [
        IndexEntry(name, "file", len(data), hashlib.sha256(data).hexdigest(),
                   blobs=(packs.blob_id(data),)).to_line() for name, data in blobs.items()]
    with kept.open("rb") as raw:
        content = packs.unpack_content(pack.name, raw, scratch)
    bad = next(r for r in pack.blobs if r.id == packs.blob_id(blobs["f2"]))
    content.seek(bad.offset)
    content.write(b"\0" * 8)  # after the stored bytes' check: as if decompressed wrong
    content.flush()
    root = tmp_path / "root"
    root.mkdir()
    with Needs(scratch) as needs, packs.opened(pack.name, content) as opened, \
            futures.ThreadPoolExecutor(2) as pool:
        needs.load(io.BytesIO(b"".join(lines)))
        tree = _Tree(root, needs)
        tree.create()
        refs = list(opened.refs())
        with pytest.raises(IntegrityError, match=f"blob {bad.id}: content does not match"):
            _Writing(tree, pool).pack(opened, needs, refs)
        assert needs.wanted_among([r.id for r in refs]) == {bad.id}
    for name, data in blobs.items():
        if name != "f2":
            assert (root / name).read_bytes() == data
