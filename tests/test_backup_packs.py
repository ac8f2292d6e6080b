"""Backups in the packs format (issue 15): what a run stores, and what the next one skips."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from conexa_backup.blobindex import BlobIndex
from conexa_backup.manifest import IndexEntry, Manifest, id_sort_key
from conexa_backup.packs import open_pack, pack_key, pack_name
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
    """The backup's uploads index on the local target (unencrypted, unkeyed), its pieces
    read from the packs that hold them."""
    return _index_at(ws.backups, backup_id)


def index_pieces(root: Path, backup_id: str) -> list[dict[str, Any]]:
    """The pieces the backup's uploads index was stored in (its artifact's lines), on the
    local target at ``root``."""
    import zstandard

    raw = (root / backup_id / "uploads.index.jsonl.zst").read_bytes()
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return [json.loads(line) for line in plain.splitlines()]


def index_bytes(root: Path, backup_id: str) -> bytes:
    """The backup's uploads index (JSON lines), joined from its pieces in the packs under
    ``root`` (a local target's folder)."""
    pieces = index_pieces(root, backup_id)
    assert pieces and all(set(p) == {"chunk", "size", "sha256"} for p in pieces), pieces
    blobs: dict[str, bytes] = {}
    for name in stored_packs(root):
        with open(root / pack_key(name), "rb") as stored, \
                open_pack(name, stored, root.parent) as pack:
            blobs.update((p["chunk"], pack.read(p["chunk"])) for p in pieces
                         if p["chunk"] in pack)
    return b"".join(blobs[p["chunk"]] for p in pieces)


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
    first = backup(ws)
    before = stored_packs(ws.backups)
    (ws.uploads / "new.bin").write_bytes(b"fresh bytes" * 1000)
    second = backup(ws)
    added = stored_packs(ws.backups).keys() - before.keys()
    assert len(added) == 1
    new = next(e for e in index_of(ws, second) if e.path == "new.bin")
    with BlobIndex.open(ws.state) as index:
        held = index.pack_blobs(added.pop())
    # The new file's blob, and the pieces of the index that changed: nothing else.
    changed = {(p["chunk"], p["size"]) for p in index_pieces(ws.backups, second)} \
        - {(p["chunk"], p["size"]) for p in index_pieces(ws.backups, first)}
    assert changed and sorted(held) == sorted({(new.blobs[0], 11000), *changed})  # type: ignore[index]


def two_targets(ws: Workspace, other: Path, extra: str = "", other_extra: str = "") -> None:
    packs_config(ws, extra + f'[[targets]]\nname = "other"\ntype = "local"\npath = "{other}"\n'
                 + other_extra)


def blobs_named(ws: Workspace, backup_id: str, root: Path | None = None) -> set[str]:
    """Every blob the backup references: its files' and its index's pieces."""
    root = ws.backups if root is None else root
    pieces = {p["chunk"] for p in index_pieces(root, backup_id)}
    return pieces | {b for e in _index_at(root, backup_id) for b in (e.blobs or ())}


def _index_at(root: Path, backup_id: str) -> list[IndexEntry]:
    return [IndexEntry.from_line(line) for line in index_bytes(root, backup_id).splitlines()]


def blobs_in_packs(root: Path) -> dict[str, str]:
    """blob id -> pack name, read from the packs stored under ``root`` (not from any cache)."""
    from conexa_backup.packs import read_index

    found = {}
    for name in stored_packs(root):
        with (root / "packs" / name[:2] / name).open("rb") as fh:
            for ref in read_index(name, fh, root.parent).blobs:
                found[ref.id] = name
    return found


def test_a_target_added_later_gets_every_blob_and_the_others_nothing_new(
        ws: Workspace) -> None:
    packs_config(ws)
    first = backup(ws)
    before = stored_packs(ws.backups)
    other = ws.root / "other"
    two_targets(ws, other)
    (ws.uploads / "new.bin").write_bytes(b"n" * 4000)
    second = backup(ws)
    added = stored_packs(ws.backups).keys() - before.keys()
    assert len(added) == 1  # the first target lacked only the new file's blob
    changed = {p["chunk"] for p in index_pieces(ws.backups, second)} \
        - {p["chunk"] for p in index_pieces(ws.backups, first)}
    with BlobIndex.open(ws.state) as index:  # and the index's changed pieces
        assert len(index.pack_blobs(added.pop())) == 1 + len(changed)
    assert blobs_named(ws, second) <= blobs_in_packs(other).keys()
    files_blobs = [{b for e in index_of(ws, i) for b in (e.blobs or ())} for i in (first, second)]
    assert files_blobs[1] > files_blobs[0]
    assert (other / second / "manifest.json").is_file()
    assert not (other / first).exists()


def test_a_new_blob_goes_into_one_pack_stored_on_both_targets(ws: Workspace) -> None:
    other = ws.root / "other"
    two_targets(ws, other)
    backup(ws)
    before = stored_packs(ws.backups)
    assert stored_packs(other) == before  # same packs, produced once: same names
    (ws.uploads / "new.bin").write_bytes(b"x" * 5000)
    backup(ws)
    added = stored_packs(ws.backups).keys() - before.keys()
    assert len(added) == 1 and added == stored_packs(other).keys() - before.keys()


def test_a_lost_pack_is_stored_again_by_the_next_backup(ws: Workspace) -> None:
    packs_config(ws)
    first = backup(ws)
    for name in stored_packs(ws.backups):
        (ws.backups / "packs" / name[:2] / name).unlink()
    second = backup(ws)
    assert blobs_named(ws, second) == blobs_named(ws, first)
    assert blobs_named(ws, second) <= blobs_in_packs(ws.backups).keys()
    listed = ws.run("list", "--json")
    states = {b["id"]: b["status"] for b in json.loads(listed.stdout)}
    # The run that saw the packs gone says so of the backup that needed them.
    assert states == {first: "damaged", second: "complete"}, listed.stdout


def test_a_lost_cache_is_rebuilt_from_the_packs_without_storing_them_again(
        ws: Workspace) -> None:
    import shutil

    packs_config(ws)
    backup(ws)
    before = stored_packs(ws.backups)
    shutil.rmtree(ws.state / "packs")
    shutil.rmtree(ws.state / "filecache")
    backup(ws)
    assert stored_packs(ws.backups) == before
    with BlobIndex.open(ws.state) as index:
        assert {p.name for p in index.held("local")} == before.keys()


def test_a_monthly_tier_gets_the_blobs_of_the_backups_it_skipped(ws: Workspace) -> None:
    other = ws.root / "monthly"
    two_targets(ws, other, other_extra="retention = { keep_monthly = 12 }\n")
    first = backup(ws)
    assert (other / first / "manifest.json").is_file()
    (ws.uploads / "mid-month.bin").write_bytes(b"m" * 3000)
    second = backup(ws)
    assert not (other / second).exists()  # not for this tier: same month
    assert not blobs_named(ws, second) <= blobs_in_packs(other).keys()
    assert blobs_named(ws, second) <= blobs_in_packs(ws.backups).keys()


def test_a_failing_target_does_not_commit_and_the_other_holds_every_blob(
        ws: Workspace) -> None:
    other = ws.root / "other"
    two_targets(ws, other)
    other.mkdir()
    (other / "packs").write_text("not a folder")  # every pack upload there fails
    result = ws.run("backup", "--json", "--no-prune")
    assert result.returncode == 3, result.stderr
    backup_id = json.loads(result.stdout)["id"]
    assert not (other / backup_id / "manifest.json").exists()
    assert blobs_named(ws, backup_id) <= blobs_in_packs(ws.backups).keys()


def test_encrypted_packs_use_keyed_ids_and_hide_every_name(ws: Workspace) -> None:
    from tests.test_trust import KNOWN_PLAINTEXT, encryption_toml, make_age_key

    key = make_age_key(ws.root / "keys" / "age.txt")
    dedup = ws.root / "keys" / "dedup.key"
    dedup.write_text("ab" * 32 + "\n")
    dedup.chmod(0o600)
    packs_config(ws, encryption_toml(key) + f'dedup_key_file = "{dedup}"\n')
    first = backup(ws)
    manifest = Manifest.from_json((ws.backups / first / "manifest.json").read_bytes(), "t")
    assert manifest.uploads is not None and manifest.uploads.ids == "hmac-sha256"
    for name in stored_packs(ws.backups):
        data = (ws.backups / "packs" / name[:2] / name).read_bytes()
        assert data.startswith(b"age-encryption.org/v1\n")
        assert not any(p in data for p in KNOWN_PLAINTEXT)
    plain_sha = {hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in ws.uploads.rglob("*") if p.is_file() and not p.is_symlink()}
    with BlobIndex.open(ws.state) as index:
        stored = {b for p in index.held("local") for b, _ in index.pack_blobs(p.name)}
    assert stored and not stored & plain_sha  # ids reveal no file's SHA-256


def test_packs_with_encryption_need_a_dedup_key_and_refuse_object_lock(
        ws: Workspace) -> None:
    from tests.test_trust import encryption_toml, make_age_key

    key = make_age_key(ws.root / "keys" / "age.txt")
    packs_config(ws, encryption_toml(key))
    result = ws.run("backup")
    assert result.returncode == 2 and "dedup_key_file" in result.stderr
    assert "Traceback" not in result.stderr
    packs_config(ws, '[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "locked-bucket"\n'
                 'object_lock_mode = "GOVERNANCE"\nobject_lock_days = 30\n')
    result = ws.run("backup")
    assert result.returncode == 2 and "Object Lock" in result.stderr, result.stderr


def test_a_malformed_dedup_key_is_one_clear_line(ws: Workspace) -> None:
    from tests.test_trust import encryption_toml, make_age_key

    key = make_age_key(ws.root / "keys" / "age.txt")
    dedup = ws.root / "keys" / "dedup.key"
    dedup.write_text("not hex at all, a secret perhaps\n")
    packs_config(ws, encryption_toml(key) + f'dedup_key_file = "{dedup}"\n')
    result = ws.run("backup")
    assert result.returncode == 2, result.stderr
    assert "64 hex digits" in result.stderr and "secret perhaps" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_line_formatted_directly_is_the_json_of_its_fields() -> None:
    import dataclasses

    entry = IndexEntry('a"b/\u00e9\udce9', "file", 5, "ab" * 32, mode=0o644, uid=33, gid=34,
                       mtime_ns=10**18 + 7, blobs=("cd" * 32, "ef" * 32))
    line = entry.to_line()
    fields = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(entry).items() if v is not None}
    assert json.loads(line) == fields and line.endswith(b"}\n") and line.count(b"\n") == 1
    assert IndexEntry.from_line(line) == entry
    odd = dataclasses.replace(entry, blobs=('x", "y',))  # not an id: the generic path
    assert json.loads(odd.to_line())["blobs"] == ['x", "y']


def test_a_later_target_failing_alone_does_not_stop_the_others(ws: Workspace) -> None:
    packs_config(ws)
    backup(ws)
    other = ws.root / "other"
    two_targets(ws, other)
    other.mkdir()
    (other / "packs").write_text("not a folder")  # only this target lacks blobs: it fails
    (ws.uploads / "new.bin").write_bytes(b"z" * 2000)
    result = ws.run("backup", "--json", "--no-prune")
    assert result.returncode == 3, result.stderr
    backup_id = json.loads(result.stdout)["id"]
    assert (ws.backups / backup_id / "manifest.json").is_file()
    assert not (other / backup_id / "manifest.json").exists()
    assert blobs_named(ws, backup_id) <= blobs_in_packs(ws.backups).keys()
    with BlobIndex.open(ws.state) as index:
        assert not list(index.held("other"))  # nothing recorded as stored there


def test_check_loads_the_dedup_key_and_names_the_format(ws: Workspace) -> None:
    from tests.test_trust import encryption_toml, make_age_key

    key = make_age_key(ws.root / "keys" / "age.txt")
    dedup = ws.root / "keys" / "dedup.key"
    dedup.write_text("0f" * 32)
    packs_config(ws, encryption_toml(key) + f'dedup_key_file = "{dedup}"\n')
    result = ws.run("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "format packs, keyed blob ids" in result.stdout
    dedup.write_text("0f" * 31)
    result = ws.run("check")
    assert result.returncode != 0 and "64 hex digits" in result.stdout + result.stderr


def test_a_pack_rewritten_elsewhere_is_not_a_lost_pack(ws: Workspace) -> None:
    """Another host's GC repacked the blobs: the old pack is gone, a new one holds them."""
    from conexa_backup.packs import PackWriter, StoredPack, open_pack

    packs_config(ws)
    first = backup(ws)
    scratch = ws.root / "scratch"
    scratch.mkdir()
    for name in stored_packs(ws.backups):
        old = ws.backups / "packs" / name[:2] / name

        def place(pack: StoredPack) -> None:
            dest = ws.backups / pack.key
            dest.parent.mkdir(exist_ok=True)
            dest.write_bytes(pack.path.read_bytes())

        with old.open("rb") as fh, open_pack(name, fh, scratch) as reader, \
                PackWriter(scratch, place, compression=None) as writer:
            for blob, data in reversed(list(reader.blobs())):  # other order: another pack
                writer.add(blob, data)
        old.unlink()
    second = backup(ws)
    states = {b["id"]: b["status"] for b in json.loads(ws.run("list", "--json").stdout)}
    assert states == {first: "complete", second: "complete"}


def test_a_pack_that_cannot_be_written_fails_the_run_not_one_file(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full staging disk is the packer's failure: never "cannot read" for the file being
    read, and never a complete backup whose index names blobs no pack holds."""
    import errno

    from conexa_backup import packs
    from conexa_backup.actions.backup import run_backup
    from conexa_backup.actions.context import Context
    from conexa_backup.config.loading import load_config
    from conexa_backup.errors import ConexaError

    packs_config(ws)
    writes = {"n": 0}
    real = packs._Open.write

    def full(self: packs._Open, data: bytes) -> None:
        writes["n"] += 1
        if writes["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(packs._Open, "write", full)
    with pytest.raises(ConexaError, match=r"cannot write a pack.*No space left"):
        run_backup(Context(load_config(ws.config)[0]), parts=("uploads",), prune=False)
    assert not list(ws.backups.glob("*/manifest.json"))


def test_a_file_changed_within_a_tick_of_its_read_is_not_cached() -> None:
    from conexa_backup.actions.backup_packs import _racy

    def st(mtime_ns: int, ctime_ns: int) -> os.stat_result:
        return os.stat_result((0o100644, 1, 1, 1, 0, 0, 5, 0, 0, 0),
                              {"st_mtime_ns": mtime_ns, "st_ctime_ns": ctime_ns})

    now = 1_800_000_000_123_456_789
    assert _racy(st(1, now - 5_000_000), now)  # changed 5 ms before: same tick, maybe
    assert not _racy(st(1, now - 50_000_000), now)
    whole = 1_800_000_000 * 10**9  # whole seconds: a coarse file system's times
    assert _racy(st(whole, whole), whole + 1_500_000_000)
    assert not _racy(st(whole, whole), whole + 2_500_000_000)


def _flip_every_pack(root: Path) -> None:
    for name in stored_packs(root):
        path = root / "packs" / name[:2] / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_a_pack_verify_proved_damaged_is_not_trusted_by_later_backups(ws: Workspace) -> None:
    packs_config(ws)
    first = backup(ws)
    _flip_every_pack(ws.backups)
    assert ws.run("verify", first).returncode != 0
    (ws.uploads / "later.bin").write_bytes(b"l" * 3000)
    second = backup(ws)
    result = ws.run("verify", second)
    assert result.returncode == 0, result.stdout + result.stderr  # its blobs stored again
    states = {b["id"]: b["status"] for b in json.loads(ws.run("list", "--json").stdout)}
    assert states == {first: "damaged", second: "complete"}


def test_a_loss_seen_by_a_prune_is_not_hidden_from_later_signals(ws: Workspace) -> None:
    packs_config(ws)
    first = backup(ws)
    for name in stored_packs(ws.backups):
        (ws.backups / "packs" / name[:2] / name).unlink()
    assert ws.run("prune", "--dry-run").returncode in (0, 3)
    second = backup(ws)
    states = {b["id"]: b["status"] for b in json.loads(ws.run("list", "--json").stdout)}
    assert states == {first: "damaged", second: "complete"}


def _run_logged(ws: Workspace, caplog: pytest.LogCaptureFixture, *, rehash: bool = False
                ) -> str:
    """One uploads-only backup in this process; its "new blobs" log line."""
    import logging

    from conexa_backup.actions.backup import run_backup
    from conexa_backup.actions.context import Context
    from conexa_backup.config.loading import load_config

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_backup(Context(load_config(ws.config)[0]), parts=("uploads",), prune=False,
                   rehash=rehash)
    return next(r.getMessage() for r in caplog.records if "new blobs" in r.getMessage())


def test_a_folder_too_large_to_hold_is_looked_up_file_by_file(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from conexa_backup.actions import backup_packs
    from conexa_backup.filecache import FileCache, key_fingerprint
    from conexa_backup.folderblocks import FIELDS, Block

    packs_config(ws, "rehash_share = 0\n")
    monkeypatch.setattr(backup_packs, "FOLDER_IN_MEMORY", 2)
    _run_logged(ws, caplog)
    _run_logged(ws, caplog)  # files made within a clock tick of the first run's reads: racy
    victim = max((p for p in ws.uploads.rglob("*") if p.is_file() and not p.is_symlink()),
                 key=lambda p: sum(1 for q in p.parent.iterdir() if q.is_file()))
    assert sum(1 for q in victim.parent.iterdir() if q.is_file()) > 2
    victim.unlink()
    assert "(0 read, 0 bytes)" in _run_logged(ws, caplog)
    with FileCache.open(ws.state, ws.uploads, key_fingerprint(None)) as cache:
        rows = cache._conn.execute("SELECT per_file, recs FROM folders").fetchall()
        assert any(per_file for per_file, _ in rows)  # the large folders: file by file
        assert max(len(Block(recs, 0, False).fields) for _, recs in rows) <= 2 * FIELDS
        rel = str(victim.relative_to(ws.uploads))
        assert cache._conn.execute("SELECT count(*) FROM files WHERE path = ?",
                                   (rel.encode(),)).fetchone() == (0,)
        sibling = next(q for q in victim.parent.iterdir() if q.is_file())
        assert cache.lookup(str(sibling.relative_to(ws.uploads)),
                            sibling.lstat()) is not None


def settled(root: Path) -> None:
    """Wait until every file under ``root`` changed more than a clock tick ago: a backup then
    caches them all (none is racy)."""
    newest = max(p.lstat().st_ctime_ns for p in root.rglob("*"))
    while time.time_ns() - newest < 50_000_000:
        time.sleep(0.005)


def fullest_folder(root: Path) -> Path:
    """The folder holding the most files under ``root``."""
    folders = [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]
    return max(folders, key=lambda d: sum(1 for q in d.iterdir()
                                          if q.is_file() and not q.is_symlink()))


def spill_large_folders(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders of more than two files are cached file by file (and there is one)."""
    from conexa_backup.actions import backup_packs

    monkeypatch.setattr(backup_packs, "FOLDER_IN_MEMORY", 2)
    assert sum(1 for q in fullest_folder(ws.uploads).iterdir() if q.is_file()) > 2


def spilled_rows(ws: Workspace) -> int:
    from conexa_backup.filecache import FileCache, key_fingerprint

    with FileCache.open(ws.state, ws.uploads, key_fingerprint(None)) as cache:
        return int(cache._conn.execute("SELECT count(*) FROM files").fetchone()[0])


@pytest.mark.parametrize("spilled", [False, True], ids=["blocks", "file by file"])
def test_an_unchanged_tree_asks_about_no_blob_once_a_backup_proved_them(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        spilled: bool) -> None:
    packs_config(ws, "rehash_share = 0\n")
    if spilled:
        spill_large_folders(ws, monkeypatch)
    settled(ws.uploads)
    _run_logged(ws, caplog)
    assert (spilled_rows(ws) > 0) == spilled
    asked: list[tuple[str, object]] = []
    for name in ("holders", "everywhere", "present", "note_everywhere"):
        real = getattr(BlobIndex, name)

        def spy(self: BlobIndex, *args: object, _real: object = real, _name: str = name
                ) -> object:
            asked.append((_name, args[0] if args else None))
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(BlobIndex, name, spy)

    def about_pieces_only() -> bool:
        """Only the index's pieces were asked about (one query each): no file's blob."""
        latest = max((p.name for p in ws.backups.iterdir() if (p / "manifest.json").exists()),
                     key=id_sort_key)
        pieces = [("holders", p["chunk"]) for p in index_pieces(ws.backups, latest)]
        return asked == pieces

    assert "(0 read, 0 bytes)" in _run_logged(ws, caplog)
    assert about_pieces_only(), asked
    # Every file read again (--rehash): what it hashes to is held, proven: still no question.
    asked.clear()
    assert "0 new blobs" in (line := _run_logged(ws, caplog, rehash=True))
    assert "(0 read" not in line and about_pieces_only(), asked
    # The pack index rebuilt (another file): its proofs no longer stand, so blobs are asked.
    import shutil

    shutil.rmtree(ws.state / "packs")
    assert "0 new blobs" in _run_logged(ws, caplog)
    assert asked


@pytest.mark.parametrize("spilled", [False, True], ids=["blocks", "file by file"])
def test_what_a_failed_run_cached_is_checked_before_it_is_trusted(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        spilled: bool) -> None:
    """A run that read a new file, cached it, then failed before its pack was stored: the
    proof of the backup before does not cover that folder (or file), so the next run stores
    it."""
    import errno

    from conexa_backup import packs
    from conexa_backup.errors import ConexaError

    packs_config(ws, "rehash_share = 0\n")
    if spilled:
        spill_large_folders(ws, monkeypatch)
    _run_logged(ws, caplog)
    assert (spilled_rows(ws) > 0) == spilled
    new = fullest_folder(ws.uploads) / "later.bin"
    new.write_bytes(os.urandom(5000))
    settled(ws.uploads)  # not racy: cached by the run that reads it
    real = packs.PackWriter.flush

    def full(self: packs.PackWriter) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packs.PackWriter, "flush", full)
    with pytest.raises(ConexaError):
        _run_logged(ws, caplog)
    monkeypatch.setattr(packs.PackWriter, "flush", real)
    _run_logged(ws, caplog)
    latest = sorted(p.parent.name for p in ws.backups.glob("*/manifest.json"))[-1]
    assert blobs_named(ws, latest) <= blobs_in_packs(ws.backups).keys()
    result = ws.run("verify", latest)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_file_by_file_entry_read_again_and_not_kept_is_forgotten(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A cached file read again (chosen for the rehash, or a blob lacking) whose new read
    cannot be cached (racy) loses its entry: an entry the run met but did not vouch for
    must not stay, for the run's proof would then cover blob ids it never checked."""
    from conexa_backup.actions import backup_packs

    packs_config(ws, "rehash_share = 0\n")
    spill_large_folders(ws, monkeypatch)
    settled(ws.uploads)
    _run_logged(ws, caplog)
    assert spilled_rows(ws) > 0
    packs_config(ws, "rehash_share = 1\n")  # every file read again...
    monkeypatch.setattr(backup_packs, "_racy", lambda st, started: True)  # ...none cacheable
    _run_logged(ws, caplog)
    assert spilled_rows(ws) == 0


def test_a_cache_that_fails_is_one_line_naming_state_dir(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from conexa_backup.actions.backup import run_backup
    from conexa_backup.actions.context import Context
    from conexa_backup.config.loading import load_config
    from conexa_backup.errors import ConexaError
    from conexa_backup.filecache import FileCache

    packs_config(ws)

    def full(self: FileCache, dir_rel: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(FileCache, "folder", full)
    with pytest.raises(ConexaError, match=r"state_dir .*: the file cache or pack index "
                       r"failed: database or disk is full"):
        run_backup(Context(load_config(ws.config)[0]), parts=("uploads",), prune=False)


def test_a_pack_index_gone_back_never_lets_an_old_proof_hide_a_loss(ws: Workspace) -> None:
    """The pack index rolled back (a power cut lost its last commits, or an older copy was
    put back) while the file cache kept a later proof: the next loss gets a count the proof
    has already seen. The proof must not stand then (found by review, reproduced)."""
    import shutil

    other = ws.root / "other"
    two_targets(ws, other, "rehash_share = 0\n")
    for path in list(ws.uploads.iterdir()):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (ws.uploads / "a").mkdir()
    (ws.uploads / "a" / "x").write_bytes(os.urandom(3000))
    settled(ws.uploads)
    backup(ws)
    first_packs = set(stored_packs(ws.backups))
    (ws.uploads / "b").mkdir()
    (ws.uploads / "b" / "y").write_bytes(os.urandom(3000))
    settled(ws.uploads)
    backup(ws)
    (pack_b,) = set(stored_packs(ws.backups)) - first_packs
    saved = ws.root / "index-then"
    shutil.copytree(ws.state / "packs", saved)
    lost = next(iter(first_packs))
    (other / "packs" / lost[:2] / lost).unlink()  # "other" loses a pack: counted, then proven
    backup(ws)
    shutil.rmtree(ws.state / "packs")
    shutil.copytree(saved, ws.state / "packs")  # the index goes back to before that
    (ws.backups / "packs" / pack_b[:2] / pack_b).unlink()  # "local" loses b/y's pack
    result = ws.run("backup", "--json", "--no-prune", "--target", "local")
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout)["id"]
    assert blobs_named(ws, last) <= blobs_in_packs(ws.backups).keys()
    verified = ws.run("verify", last)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_folder_that_grows_past_a_block_is_spilled_whatever_the_order(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """New files sorted before the cached ones (read first, then the rest kept): the folder
    still goes file by file once it holds more than a block's worth (memory stays flat)."""
    import shutil

    from conexa_backup.actions import backup_packs
    from conexa_backup.filecache import FileCache, key_fingerprint
    from conexa_backup.folderblocks import FIELDS, Block

    packs_config(ws, "rehash_share = 0\n")
    monkeypatch.setattr(backup_packs, "FOLDER_IN_MEMORY", 2)
    for path in list(ws.uploads.iterdir()):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    big = ws.uploads / "big"
    big.mkdir()
    for name in ("b", "c"):
        (big / name).write_bytes(os.urandom(100))
    settled(ws.uploads)
    _run_logged(ws, caplog)
    (big / "a").write_bytes(os.urandom(100))
    settled(ws.uploads)
    _run_logged(ws, caplog)
    with FileCache.open(ws.state, ws.uploads, key_fingerprint(None)) as cache:
        rows = cache._conn.execute("SELECT per_file, recs FROM folders").fetchall()
        assert max(len(Block(recs, 0, False).fields) for _, recs in rows) <= 2 * FIELDS
        assert any(per_file for per_file, _ in rows)
    assert "(0 read, 0 bytes)" in _run_logged(ws, caplog)  # file by file, all cached
