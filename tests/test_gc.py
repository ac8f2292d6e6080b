"""Garbage collection of packs in ``prune`` (issue 15): what goes, when, and that no remaining
backup ever lacks a blob, even when GC is killed at any step."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from pyrage import decrypt, x25519

from conexa_backup import packs
from conexa_backup.actions.context import Context
from conexa_backup.actions.prune import prune as prune_action
from conexa_backup.blobindex import BlobIndex
from conexa_backup.config import load_config
from conexa_backup.manifest import IndexEntry, Manifest
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET, Workspace
from tests.test_backup_packs import backup, packs_config, stored_packs
from tests.test_trust import AgeKey, encryption_toml, make_age_key

DAY = 86400
KEEP_LAST_1 = '[retention]\nkeep_last = 1\n'


def gc_config(ws: Workspace, uploads: str = "", extra: str = KEEP_LAST_1) -> None:
    """A packs config keeping the newest backup only; trees may shrink (tests replace them)."""
    packs_config(ws, "max_shrink = 1\n" + uploads + extra)


# -- helpers --------------------------------------------------------------------------------------

def tree(ws: Workspace, files: dict[str, bytes]) -> None:
    """Make the uploads folder hold exactly ``files``, every entry with the same old mtime:
    with :func:`blobs`' contents, the index is the same bytes on every run, so where it is
    cut into pieces (by content) is too, and the tests' pack layouts never vary."""
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir(parents=True)
    for name, data in files.items():
        (ws.uploads / name).write_bytes(data)
    for path in (*ws.uploads.iterdir(), ws.uploads):
        os.utime(path, ns=(OLD_NS, OLD_NS))


OLD_NS = 1_700_000_000 * 10**9


def blobs(prefix: str, n: int, size: int = 20_000) -> dict[str, bytes]:
    """``n`` files of random (incompressible) bytes, the same on every run (seeded by name):
    shares of content are shares of bytes."""
    return {f"{prefix}{i}.bin": random.Random(f"{prefix}{i}").randbytes(size) for i in range(n)}


def age_packs(root: Path, seconds: int = 2 * DAY) -> None:
    """Make every pack on a local target look ``seconds`` old (the listing's modified time)."""
    when = time.time() - seconds
    for path in (root / "packs").rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def plain(data: bytes, key: AgeKey | None) -> bytes:
    if data.startswith(packs.AGE_MAGIC):
        assert key is not None
        data = decrypt(data, [x25519.Identity.from_str(key.identity)])
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def present(root: Path, key: AgeKey | None = None, dedup: bytes | None = None) -> set[str]:
    """Every blob the packs on a local target really hold: each pack read and checked
    against its name, each blob against its id."""
    return set(_held(root, key, dedup))


def _held(root: Path, key: AgeKey | None, dedup: bytes | None,
          keep: Collection[str] = ()) -> dict[str, bytes | None]:
    """Blob id -> its bytes (those of ``keep``; None for the others), for every blob the
    packs on a local target hold, each pack checked against its name, each blob its id."""
    found: dict[str, bytes | None] = {}
    idents = [x25519.Identity.from_str(key.identity)] if key else None
    for name in stored_packs(root):
        with (root / packs.pack_key(name)).open("rb") as stored, \
                packs.open_pack(name, stored, root.parent, key=dedup, identities=idents) as rd:
            found.update((blob, data if blob in keep else None) for blob, data in rd.blobs())
    return found


def complete(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/manifest.json"))


def pieces_of(root: Path, backup_id: str, key: AgeKey | None = None) -> list[str]:
    """The ids of the pieces a backup's uploads index is stored in, in order."""
    manifest = Manifest.from_json((root / backup_id / "manifest.json").read_bytes(), "t")
    artifact = manifest.artifact("uploads-index")
    assert artifact is not None and manifest.uploads is not None
    assert manifest.uploads.index == "chunks"
    raw = plain((root / backup_id / artifact.name).read_bytes(), key)
    return [str(json.loads(line)["chunk"]) for line in raw.splitlines()]


def named_blobs(root: Path, backup_id: str, key: AgeKey | None = None,
                dedup: bytes | None = None) -> set[str]:
    """The blob ids a backup references: the pieces its uploads index is stored in, and
    the blobs the index names (read from the pieces the packs hold; when one is missing,
    the pieces alone: the backup is not whole anyway)."""
    pieces = pieces_of(root, backup_id, key)
    held = _held(root, key, dedup, keep=set(pieces))
    if any(held.get(p) is None for p in pieces):
        return set(pieces)
    index = b"".join(held[p] or b"" for p in pieces)
    return set(pieces) | {b for line in index.splitlines()
                          for b in IndexEntry.from_line(line).blobs or ()}


def assert_whole(root: Path, key: AgeKey | None = None, dedup: bytes | None = None) -> None:
    """Every listed-complete backup on a local target has every blob it names."""
    have = present(root, key, dedup)
    for backup_id in complete(root):
        missing = named_blobs(root, backup_id, key, dedup) - have
        assert not missing, f"backup {backup_id} lacks {len(missing)} blob(s)"


def prune(ws: Workspace, *args: str, code: int = 0) -> dict[str, Any]:
    """``prune --json`` on the only target: its entry."""
    result = ws.run("prune", "--json", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    entries = json.loads(result.stdout)
    return dict(entries[0])


def history(ws: Workspace, keep: int, drop: int, gone: int,
            key: AgeKey | None = None) -> tuple[str, str, list[str]]:
    """Three backups: ``keep`` files with ``drop`` more (pack ``mixed``: mostly dropped
    later), then with ``gone`` others (pack ``dead``: unreferenced once pruned, as is the
    second index's piece it holds), then the kept files alone (a pack holding only the third
    index's piece: :func:`tail`). Returns (mixed, dead, the three backup ids)."""
    kept = blobs("keep", keep)
    tree(ws, {**kept, **blobs("drop", drop)})
    ids = [backup(ws)]
    (mixed,) = stored_packs(ws.backups)
    tree(ws, {**kept, **blobs("gone", gone)})
    ids.append(backup(ws))
    (dead,) = set(stored_packs(ws.backups)) - {mixed}
    tree(ws, kept)
    ids.append(backup(ws))
    assert len(tail(ws, {mixed, dead}, key)) == 1
    return mixed, dead, ids


def tail(ws: Workspace, before: set[str], key: AgeKey | None = None) -> set[str]:
    """The packs stored since ``before``, holding pieces of the newest backup's index and
    nothing else (a backup of a tree that only lost files stores its new index, no more)."""
    new = set(stored_packs(ws.backups)) - before
    pieces = set(pieces_of(ws.backups, complete(ws.backups)[-1], key))
    with BlobIndex.open(ws.state) as index:  # (the packs may be encrypted)
        assert all({b for b, _ in index.pack_blobs(name)} <= pieces for name in new)
    return new


# -- tests ----------------------------------------------------------------------------------------

def test_a_pruned_backups_pack_goes_only_after_the_grace_period(ws: Workspace) -> None:
    gc_config(ws)
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


def test_a_shared_blob_survives_while_any_backup_references_it(ws: Workspace) -> None:
    gc_config(ws, "repack_threshold = 1.0\n")  # never repack: deletion only
    shared = blobs("shared", 1)
    tree(ws, {**blobs("a", 4), **shared})
    backup(ws)
    first_packs = set(stored_packs(ws.backups))
    tree(ws, {**blobs("b", 4), **shared})
    backup(ws)
    age_packs(ws.backups)
    entry = prune(ws)
    assert entry["gc"]["deleted_packs"] == []  # the shared blob keeps the first pack
    assert first_packs <= set(stored_packs(ws.backups))
    assert_whole(ws.backups)
    tree(ws, blobs("c", 2))
    backup(ws)
    age_packs(ws.backups)
    entry = prune(ws)
    assert first_packs <= set(entry["gc"]["deleted_packs"])  # now nobody references it
    assert not first_packs & set(stored_packs(ws.backups))
    assert_whole(ws.backups)


def test_repack_keeps_every_remaining_backup_whole(ws: Workspace) -> None:
    gc_config(ws)
    kept, dropped = blobs("keep", 4), blobs("drop", 6)
    tree(ws, {**kept, **dropped})
    first = backup(ws)
    (big,) = stored_packs(ws.backups)
    tree(ws, kept)  # 60% of the pack's content now unreferenced
    second = backup(ws)
    index_only = tail(ws, {big})  # nothing new to store but the index
    age_packs(ws.backups)
    entry = prune(ws)
    assert entry["deleted"] == [first]
    gc = entry["gc"]
    assert gc["repacked_packs"] == [big] and len(gc["written_packs"]) == 1
    after = stored_packs(ws.backups)
    assert set(after) == set(gc["written_packs"]) | index_only
    assert gc["freed_bytes"] == gc["repacked_bytes"] - gc["written_bytes"] > 0
    assert named_blobs(ws.backups, second) == present(ws.backups)
    assert_whole(ws.backups)
    # The next run knows the new pack (the cache), and it is young and fully referenced.
    assert prune(ws)["gc"]["repacked_packs"] == []


def test_below_the_threshold_nothing_is_repacked(ws: Workspace) -> None:
    gc_config(ws)
    kept = blobs("keep", 8)
    tree(ws, {**kept, **blobs("drop", 2)})  # 20% unreferenced once the first backup goes
    backup(ws)
    before = stored_packs(ws.backups)
    tree(ws, kept)
    backup(ws)
    index_only = tail(ws, set(before))
    age_packs(ws.backups)
    gc = prune(ws)["gc"]
    assert gc["repacked_packs"] == [] and gc["deleted_packs"] == []
    assert set(stored_packs(ws.backups)) == set(before) | index_only


def test_dry_run_shows_the_packs_and_bytes_gc_would_free(ws: Workspace) -> None:
    gc_config(ws)
    mixed, dead, (first, second, _) = history(ws, 4, 6, 3)
    sizes = stored_packs(ws.backups)
    when = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = prune(ws, "--at", when)  # a preview as of two days on: every pack is old then
    assert sorted(d["id"] for d in entry["plan"] if not d["keep"]) == [first, second]
    gc = entry["gc"]
    assert gc["deleted_packs"] == [dead] and gc["deleted_bytes"] == sizes[dead]
    assert gc["repacked_packs"] == [mixed] and gc["repacked_bytes"] == sizes[mixed]
    # 60% of the mixed pack's content is unreferenced: about that share of it is freed.
    assert sizes[dead] + 0.5 * sizes[mixed] < gc["freed_bytes"] < sizes[dead] + 0.7 * sizes[mixed]
    assert stored_packs(ws.backups) == sizes and len(complete(ws.backups)) == 3  # nothing done
    human = ws.run("prune", "--dry-run")
    assert human.returncode == 0, human.stderr
    assert "packs would delete 0" in human.stdout  # young: nothing without --at
    shown = ws.run("prune", "--at", when)
    assert "packs would delete 1" in shown.stdout and "would repack 1" in shown.stdout, \
        shown.stdout


def prune_all(ws: Workspace, *args: str, code: int = 0) -> dict[str, dict[str, Any]]:
    """``prune --json`` on every target: entries by target."""
    result = ws.run("prune", "--json", *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    return {e["target"]: e for e in json.loads(result.stdout)}


def test_a_target_added_later_is_collected_on_its_own(ws: Workspace) -> None:
    other = ws.root / "other"
    gc_config(ws)
    tree(ws, blobs("one", 4))
    first = backup(ws)
    local_old = set(stored_packs(ws.backups))
    gc_config(ws, extra=KEEP_LAST_1 + f'[[targets]]\nname = "other"\ntype = "local"\n'
              f'path = "{other}"\n')
    tree(ws, blobs("two", 4))
    second = backup(ws)
    assert complete(other) == [second]
    age_packs(ws.backups)
    age_packs(other)
    entries = prune_all(ws)
    assert entries["local"]["deleted"] == [first]
    assert sorted(entries["local"]["gc"]["deleted_packs"]) == sorted(local_old)
    assert entries["other"]["gc"]["deleted_packs"] == []
    assert_whole(ws.backups)
    assert_whole(other)
    refs = ws.state / "packs" / "refs"
    assert sorted(p.name for p in refs.iterdir()) == [f"{second}.ids"]  # first: on no target


def test_refs_lost_from_the_cache_are_rebuilt_from_the_uploads_index(ws: Workspace) -> None:
    gc_config(ws)
    kept = blobs("keep", 2)
    tree(ws, {**kept, **blobs("drop", 4)})
    backup(ws)
    (mixed,) = stored_packs(ws.backups)
    tree(ws, kept)
    second = backup(ws)
    shutil.rmtree(ws.state / "packs")  # another host, or the cache lost
    age_packs(ws.backups)
    gc = prune(ws)["gc"]
    assert gc["skipped"] is None and gc["repacked_packs"] == [mixed]
    assert (ws.state / "packs" / "refs" / f"{second}.ids").is_file()
    assert_whole(ws.backups)


def test_an_unreadable_manifest_stops_gc_on_that_target(ws: Workspace) -> None:
    gc_config(ws)
    tree(ws, blobs("one", 3))
    first = backup(ws)
    tree(ws, blobs("two", 3))
    backup(ws)
    third = backup(ws)
    before = stored_packs(ws.backups)
    (ws.backups / first / "manifest.json").write_bytes(b"{not json")
    age_packs(ws.backups)
    entry = prune(ws)
    assert "unreadable manifest" in entry["gc"]["skipped"] and first in entry["gc"]["skipped"]
    assert stored_packs(ws.backups) == before  # a warning, and every pack kept
    assert third in complete(ws.backups)
    human = ws.run("prune")
    assert human.returncode == 0 and "no pack collected" in human.stdout, human.stdout


def encrypted(ws: Workspace, *, identity: bool, uploads: str = "") -> tuple[AgeKey, bytes]:
    key = make_age_key(ws.root / "keys" / "age.txt")
    dedup = bytes.fromhex("ab" * 32)
    (ws.root / "keys" / "dedup").write_text(dedup.hex())
    (ws.root / "keys" / "dedup").chmod(0o600)
    gc_config(ws, uploads, KEEP_LAST_1 + encryption_toml(key, identity=identity)
              + f'dedup_key_file = "{ws.root / "keys" / "dedup"}"\n')
    return key, dedup


def test_encrypted_without_identity_deletes_but_does_not_repack(ws: Workspace) -> None:
    key, dedup = encrypted(ws, identity=False)
    mixed, dead, _ = history(ws, 2, 4, 2, key)
    index_only = tail(ws, {mixed, dead}, key)
    age_packs(ws.backups)
    gc = prune(ws)["gc"]
    assert gc["deleted_packs"] == [dead] and gc["repacked_packs"] == []
    assert any("no age identity" in n for n in gc["notes"]), gc["notes"]
    assert set(stored_packs(ws.backups)) == {mixed} | index_only
    assert_whole(ws.backups, key, dedup)
    # A restore host's config (identity and dedup key, no recipients) never rewrites the
    # school's uploads in plaintext: the pack stays as it is.
    dedup_line = f'dedup_key_file = "{ws.root / "keys" / "dedup"}"\n'
    gc_config(ws, extra=KEEP_LAST_1 + f'[encryption]\nidentity_file = "{key.file}"\n'
              + dedup_line)
    gc = prune(ws)["gc"]
    assert gc["repacked_packs"] == [] and set(stored_packs(ws.backups)) == {mixed} | index_only
    assert any("no [encryption] recipients" in n for n in gc["notes"]), gc["notes"]
    # With the identity (a restore host), the mixed pack is repacked, encrypted and keyed.
    encrypted_again = encryption_toml(key) + f'dedup_key_file = "{ws.root / "keys" / "dedup"}"\n'
    gc_config(ws, extra=KEEP_LAST_1 + encrypted_again)
    gc = prune(ws)["gc"]
    assert gc["repacked_packs"] == [mixed] and gc["notes"] == []
    (new,) = set(stored_packs(ws.backups)) - index_only
    assert (ws.backups / packs.pack_key(new)).read_bytes().startswith(packs.AGE_MAGIC)
    assert_whole(ws.backups, key, dedup)


def test_refs_lost_and_no_identity_keep_every_pack(ws: Workspace) -> None:
    key, dedup = encrypted(ws, identity=False)
    tree(ws, blobs("one", 2))
    backup(ws)
    tree(ws, blobs("two", 2))
    second = backup(ws)
    before = stored_packs(ws.backups)
    (ws.state / "packs" / "refs" / f"{second}.ids").unlink()
    age_packs(ws.backups)
    entry = prune(ws)
    assert second in entry["gc"]["skipped"] and "cannot be read" in entry["gc"]["skipped"]
    assert stored_packs(ws.backups) == before
    assert_whole(ws.backups, key, dedup)


KILLER = Path(__file__).with_name("gc_killer.py")


def killed_prune(ws: Workspace, step: int) -> subprocess.CompletedProcess[str]:
    """``prune`` SIGKILLed at GC step ``step`` (tests/gc_killer.py); runs to the end when
    there are fewer steps."""
    return subprocess.run([sys.executable, str(KILLER), "--config", str(ws.config), "prune"],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "GC_KILL_AT": str(step)}, stdin=subprocess.DEVNULL)


def referenced_by_all(root: Path) -> set[str]:
    return set().union(*(named_blobs(root, i) for i in complete(root)))


def test_sigkill_at_every_gc_step_leaves_every_backup_whole(ws: Workspace,
                                                            tmp_path: Path) -> None:
    gc_config(ws)
    mixed, dead, (_, _, last) = history(ws, 3, 5, 2)
    shutil.rmtree(ws.state / "packs" / "refs")  # rebuilt from the index: steps too
    age_packs(ws.backups)
    pristine = tmp_path / "pristine"
    shutil.copytree(ws.backups, pristine / "backups")
    shutil.copytree(ws.state, pristine / "state")
    killed_at = []
    for step in range(1, 100):
        for name in ("backups", "state"):
            shutil.rmtree(getattr(ws, name))
            shutil.copytree(pristine / name, getattr(ws, name))
        run = killed_prune(ws, step)
        if run.returncode == 0:
            break
        assert run.returncode == -signal.SIGKILL, (step, run.stderr)
        killed_at.append(run.stderr.strip().splitlines()[-1])
        assert_whole(ws.backups)  # at no point does a complete backup lack a blob
        assert last in complete(ws.backups)
        rerun = ws.run("prune", "--json")  # finishes the job
        assert rerun.returncode == 0, (step, rerun.stderr)
        stored = set(stored_packs(ws.backups))
        assert not {mixed, dead} & stored, (killed_at[-1], stored)
        assert_whole(ws.backups)
        assert not list((ws.state / "staging").glob("gc-refs*")), "scratch left behind"
        for name in stored:  # nothing unreferenced left behind
            with (ws.backups / packs.pack_key(name)).open("rb") as fh:
                index = packs.read_index(name, fh, tmp_path)
            assert {b.id for b in index.blobs} & referenced_by_all(ws.backups), killed_at[-1]
    else:
        raise AssertionError("prune never finished")
    steps = "\n".join(killed_at)
    for expected in ("before upload_pack", "after add_pack", "before delete_pack",
                     "before drop_held", "after delete_pack", "write_refs", "forget_refs"):
        assert expected in steps, steps
    assert len(killed_at) >= 14, steps


def test_gc_grace_and_repack_threshold_are_configurable(ws: Workspace) -> None:
    gc_config(ws, 'gc_grace = "1h"\nrepack_threshold = 0.9\n')
    _, dead, _ = history(ws, 4, 6, 2)
    age_packs(ws.backups, 2 * 3600)  # two hours: past a grace of one
    gc = prune(ws)["gc"]
    assert gc["deleted_packs"] == [dead] and gc["repacked_packs"] == []  # 60% < 90%
    for bad, why in (('gc_grace = "soon"', "invalid duration"), ("repack_threshold = 0", "0")):
        gc_config(ws, bad + "\n")
        result = ws.run("prune", "--dry-run")
        assert result.returncode == 2 and why in result.stderr, result.stderr


def test_refs_stay_while_a_target_could_not_be_listed(ws: Workspace) -> None:
    other = ws.root / "other"
    gc_config(ws, extra=KEEP_LAST_1 + f'[[targets]]\nname = "other"\ntype = "local"\n'
              f'path = "{other}"\n')
    tree(ws, blobs("one", 2))
    first = backup(ws)
    tree(ws, blobs("two", 2))
    second = backup(ws)
    refs = ws.state / "packs" / "refs"
    other.rename(ws.root / "other.away")
    other.write_text("not a folder: this target cannot be listed")
    entries = prune_all(ws, code=3)
    assert entries["local"]["deleted"] == [first] and entries["other"]["skipped"]
    assert (refs / f"{first}.ids").is_file()  # it may still be on the target not listed
    other.unlink()
    (ws.root / "other.away").rename(other)
    entries = prune_all(ws)
    assert entries["other"]["deleted"] == [first]
    assert sorted(p.name for p in refs.iterdir()) == [f"{second}.ids"]


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_gc_on_a_cloud_target(ws: Workspace, s3_server: S3Server, gcs_server: GCSServer,
                              kind: str, tmp_path: Path) -> None:
    where = (f'bucket = "{S3_BUCKET}"\nendpoint_url = "{s3_server.endpoint}"\n' if kind == "s3"
             else f'bucket = "{GCS_BUCKET}"\n')
    gc_config(ws, extra=KEEP_LAST_1 + f'[[targets]]\nname = "{kind}"\ntype = "{kind}"\n'
              f'{where}prefix = "gc-{tmp_path.name}"\n')
    mixed, dead, (_, _, last) = history(ws, 3, 5, 2)
    index_only = tail(ws, {mixed, dead})
    ctx = Context(load_config(ws.config)[0])
    cloud = ctx.targets([kind])[0]
    # The listing's times are the cloud's own: judge them two days on (the action's clock).
    results = prune_action(ctx, at=datetime.now(UTC) + timedelta(days=2))
    report = next(r for r in results if r.target == kind).gc
    assert report is not None and not report.errors, report
    assert report.deleted == [dead] and report.repacked == [mixed]
    on_cloud = {}
    for obj in cloud.list("packs/"):
        name = packs.pack_name(obj.key)
        assert name is not None
        with cloud.open(obj.key) as stored, packs.open_pack(name, stored, tmp_path) as reader:
            on_cloud[name] = {blob for blob, _ in reader.blobs()}
    assert set(on_cloud) == set(report.written) | index_only
    assert named_blobs(ws.backups, last) <= set().union(*on_cloud.values())
    assert_whole(ws.backups)


def test_a_damaged_copy_still_references_its_blobs(ws: Workspace) -> None:
    gc_config(ws, extra="")  # no retention rules: every backup stays
    tree(ws, blobs("one", 3))
    first = backup(ws)
    only_first = set(stored_packs(ws.backups))
    tree(ws, blobs("two", 3))
    backup(ws)
    dump = next(p for p in (ws.backups / first).iterdir() if p.name.startswith("database"))
    dump.write_bytes(dump.read_bytes()[:10])  # the listing alone shows it damaged
    listed = {b["id"]: b["status"] for b in json.loads(ws.run("list", "--json").stdout)}
    assert listed[first] == "damaged"
    age_packs(ws.backups)
    gc = prune(ws)["gc"]
    assert gc["deleted_packs"] == [] and gc["skipped"] is None
    assert only_first <= set(stored_packs(ws.backups))
    assert_whole(ws.backups)


def test_the_prune_after_a_backup_collects_too(ws: Workspace) -> None:
    gc_config(ws)
    tree(ws, blobs("one", 3))
    backup(ws)
    age_packs(ws.backups)
    old = set(stored_packs(ws.backups))
    tree(ws, blobs("two", 3))
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(result.stdout)["pruned"]
    assert sorted(entry["gc"]["deleted_packs"]) == sorted(old)
    assert_whole(ws.backups)


def test_a_damaged_duplicate_never_lets_the_good_copy_of_a_blob_go(ws: Workspace) -> None:
    """Blob x is in P (good) and in D (a duplicate, damaged after the cache learned it);
    both are mostly unreferenced. Repacking D fails; it must not then count as x's holder,
    or repacking P would skip x and delete the only good copy."""
    gc_config(ws)
    keep = blobs("keep", 1)
    tree(ws, {**keep, **blobs("drop", 4)})
    backup(ws)
    (good,) = stored_packs(ws.backups)
    ((_, x_data),) = keep.items()
    x_id = packs.blob_id(x_data)
    scratch = ws.root / "scratch"
    scratch.mkdir()
    placed: list[str] = []

    def place(pack: packs.StoredPack) -> None:
        if pack.name < good:  # repacked (and failing) first: the case that mattered
            dest = ws.backups / pack.key
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(pack.path.read_bytes())
            placed.append(pack.name)

    while not placed:  # a random filler gives a random name: about one try in two
        filler = os.urandom(60_000)
        with packs.PackWriter(scratch, place) as writer:
            writer.add(x_id, x_data)
            writer.add(packs.blob_id(filler), filler)
    tree(ws, keep)
    backup(ws)  # the cache learns the duplicate from the listing
    path = ws.backups / packs.pack_key(placed[0])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    age_packs(ws.backups)
    prune(ws)
    intact: set[str] = set()
    for name in stored_packs(ws.backups):
        try:
            with (ws.backups / packs.pack_key(name)).open("rb") as fh, \
                    packs.open_pack(name, fh, scratch) as reader:
                intact.update(b for b, _ in reader.blobs())
        except packs.IntegrityError:  # the damaged duplicate
            continue
    assert x_id in intact, "the only good copy of a referenced blob was deleted"


def test_a_backup_after_gc_took_every_pack_stores_the_unchanged_tree_again(
        ws: Workspace) -> None:
    """The file cache still knows the files, but their packs are gone: the proof of the last
    backup no longer stands (GC dropped packs there), so their blobs are asked about and
    stored again."""
    gc_config(ws, "rehash_share = 0\n")
    tree(ws, blobs("f", 4))
    first = backup(ws)
    backup(ws)  # settles the files cached as racy by the first run
    for backup_id in complete(ws.backups):
        result = ws.run("delete", backup_id, "--yes", "--force")
        assert result.returncode == 0, result.stderr
    age_packs(ws.backups, DAY + 60)
    assert prune(ws)["gc"]["deleted_packs"]
    assert not stored_packs(ws.backups)
    last = backup(ws)
    assert last != first and stored_packs(ws.backups)
    assert_whole(ws.backups)
    assert named_blobs(ws.backups, last) <= present(ws.backups)
