"""Folder blocks (issue 15): a folder's cached files in one row, read ahead in the walk's
order; what a run keeps, rewrites and drops; the proofs that let an unchanged folder's blobs
go unasked, and what takes them away."""

from __future__ import annotations

import os
import sqlite3
import zlib
from pathlib import Path

import pytest

from conexa_backup import archive, filecache
from conexa_backup.blobindex import BlobIndex, Losses, RefsWriter
from conexa_backup.filecache import FileCache, key_fingerprint
from conexa_backup.folderblocks import Folder, folder_of, order_key, stat_text
from conexa_backup.manifest import IndexEntry, dir_line

FP = key_fingerprint(None)
ROOT = Path("/srv/uploads")
SHA = "cc" * 32


def fake_stat(size: int, mtime_ns: int = 1, ino: int = 1) -> os.stat_result:
    seq = (0o100644, ino, 1, 1, 0, 0, size, 0, 0, 0)
    return os.stat_result(seq, {"st_mtime_ns": mtime_ns, "st_ctime_ns": mtime_ns,
                                "st_atime_ns": 0})


def line(path: str) -> bytes:
    return IndexEntry(path, "file", 1, SHA, mode=0o644, uid=0, gid=0, mtime_ns=1,
                      blobs=("ab" * 32,)).to_line()


def fill(cache: FileCache, tree: dict[str, list[str]]) -> None:
    """One run that meets ``tree`` (folder -> file names, in walk order) and reads every file."""
    for rel, names in tree.items():
        folder = cache.folder(rel)
        for name in names:
            path = name if rel == "." else f"{rel}/{name}"
            folder.add(name, stat_text(fake_stat(len(name))), cache.place(path), SHA,
                       ["ab" * 32], line(path))
        cache.leave(folder)
    cache.finish()


def meet(cache: FileCache, tree: dict[str, list[str]]) -> dict[str, Folder]:
    """A run that meets ``tree`` unchanged: every file kept from its block."""
    seen = {}
    for rel, names in tree.items():
        folder = seen[rel] = cache.folder(rel)
        for name in names:
            at = folder.take(name, stat_text(fake_stat(len(name))))
            assert at is not None, (rel, name)
            folder.keep(at)
        cache.leave(folder)
    cache.finish()
    return seen


def test_the_row_order_is_the_walks_order(tmp_path: Path) -> None:
    # Names that are not UTF-8 (held as surrogates) sort among multi-byte ones as Python
    # sorts them: by code point.
    names = ["a", "a-c", "ab", "a b", "b", "é", "z\udcff", "Z", "0", "\udcff", "\ue000",
             "\U0001f600", "x\udc80y", "\udcc3\udca9"]
    for first in names:
        for second in names[:4]:
            (tmp_path / first / second).mkdir(parents=True, exist_ok=True)
    walked = ["."] + [e.rel for e in archive.walk(tmp_path, archive.Skipped())
                      if e.kind == 0o040000]
    assert sorted(walked, key=order_key) == walked
    assert all(folder_of(order_key(rel)) == rel for rel in walked)


def test_a_block_round_trips_odd_names_and_is_read_whole(tmp_path: Path) -> None:
    tree = {".": ["top.txt"], "caf\udce9": ["r\u00e9sum\u00e9.pdf", "x\ny"], "caf\udce9/sub": []}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        folders = meet(cache, tree)
        assert folders["caf\udce9"].line(0) == line("caf\udce9/r\u00e9sum\u00e9.pdf")
        assert not any(f.dirty for f in folders.values())
        assert len(cache) == 3


def test_a_changed_or_deleted_file_rewrites_its_folder_only(tmp_path: Path) -> None:
    tree = {".": ["a"], "d1": ["x", "y"], "d2": ["z"]}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
        first = cache.run
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        root = cache.folder(".")
        assert root.take("a", stat_text(fake_stat(1))) is not None
        cache.leave(root)
        d1 = cache.folder("d1")
        assert d1.take("x", stat_text(fake_stat(99))) is None  # changed: read again
        d1.add("x", stat_text(fake_stat(99)), cache.place("d1/x"), SHA, [], line("d1/x"))
        cache.leave(d1)  # y was not met: deleted
        d2 = cache.folder("d2")
        at = d2.take("z", stat_text(fake_stat(1)))
        assert at is not None
        d2.keep(at)
        cache.leave(d2)
        cache.finish()
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        written = {rel: cache.folder(rel).written for rel in ("d1", "d2")}
        assert written == {"d1": first + 1, "d2": first}
        assert cache.folder("d1").take("y", stat_text(fake_stat(1))) is None


def test_folders_gone_are_dropped_and_one_asked_out_of_order_is_still_found(
        tmp_path: Path) -> None:
    tree = {".": ["a"], "b": ["1"], "c": ["2"], "d": ["3"], "e": ["4"]}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        meet(cache, {".": ["a"], "c": ["2"]})  # b passed unasked, d and e after the last
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert len(cache) == 2
        assert cache.folder("c").take("2", stat_text(fake_stat(1))) is not None
        assert cache.folder(".").take("a", stat_text(fake_stat(1))) is not None  # asked late


def test_many_folders_gone_at_once_are_deleted_as_the_stream_passes_them(
        tmp_path: Path) -> None:
    tree = {".": ["a"]} | {f"d{i:04d}": ["f"] for i in range(600)}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        cache.folder(".")
        cache.folder("d0599")  # 599 folders passed in one ask (a renamed tree)
        assert len(cache._blocks.gone) < 256
        remaining = cache._conn.execute("SELECT count(*) FROM folders").fetchone()[0]
        assert remaining <= 2 + 256
        cache.finish()
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert len(cache) == 2


def test_a_run_that_stops_early_drops_no_folder_after_it(tmp_path: Path) -> None:
    tree = {".": ["a"], "b": ["1"], "c": ["2"]}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        root = cache.folder(".")
        at = root.take("a", stat_text(fake_stat(1)))
        assert at is not None
        root.keep(at)
        cache.leave(root)
        cache.folder("b")  # then the walk fails in b: no finish()
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert len(cache) == 3


def test_a_run_reads_blocks_a_few_hundred_at_a_time(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    tree = {".": ["a"]} | {f"d{i:04d}": ["f"] for i in range(600)}
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, tree)
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        queries: list[str] = []
        cache._conn.set_trace_callback(queries.append)
        meet(cache, tree)
        selects = [q for q in queries if q.startswith("SELECT") and "folders" in q]
        assert 3 <= len(selects) <= 4, selects  # 601 rows, 256 a query
        assert not [q for q in queries if q.startswith(("UPDATE", "INSERT"))]  # unchanged


def test_a_block_that_cannot_be_decoded_counts_as_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, {".": ["a"], "b": ["1"]})
        cache._conn.execute("UPDATE folders SET recs = x'00' WHERE key = ?", (order_key("b"),))
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.folder(".").take("a", stat_text(fake_stat(1))) is not None
        assert cache.folder("b").take("1", stat_text(fake_stat(1))) is None
    assert "unreadable" in caplog.text


def test_a_block_changed_in_place_is_caught_by_its_checksum(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One blob id's digit flipped in the file (damage SQLite cannot see): never used."""
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, {".": ["a"], "b": ["1"]})
        raw = cache._conn.execute("SELECT recs FROM folders WHERE key = ?",
                                  (order_key("b"),)).fetchone()[0]
        flipped = raw.replace(b"ab" * 32, b"ac" + b"ab" * 31)
        assert flipped != raw and len(flipped) == len(raw)
        cache._conn.execute("UPDATE folders SET recs = ? WHERE key = ?",
                            (flipped, order_key("b")))
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.folder(".").take("a", stat_text(fake_stat(1))) is not None
        assert cache.folder("b").take("1", stat_text(fake_stat(1))) is None
    assert "unreadable" in caplog.text


def test_a_block_whose_lines_do_not_match_its_files_counts_as_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A block whose checksum holds but whose index lines are one short (a writer's bug,
    not damage) is never used: each file would otherwise get another's line."""
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, {".": ["a"], "b": ["1", "2"]})
        raw = cache._conn.execute("SELECT recs FROM folders WHERE key = ?",
                                  (order_key("b"),)).fetchone()[0]
        body = raw[4:].removesuffix(line("b/2"))
        assert len(body) < len(raw) - 4
        cache._conn.execute("UPDATE folders SET recs = ? WHERE key = ?",
                            (zlib.crc32(body).to_bytes(4, "big") + body, order_key("b")))
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.folder(".").take("a", stat_text(fake_stat(1))) is not None
        assert cache.folder("b").take("1", stat_text(fake_stat(1))) is None
    assert "unreadable" in caplog.text


def test_confirm_records_the_proof_of_the_run_that_is_still_the_last(tmp_path: Path) -> None:
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        fill(cache, {".": ["a"]})
        run = cache.run
    filecache.confirm(tmp_path, ROOT, FP, run - 1, "stale")  # a later run has begun: no-op
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.proof is None
    filecache.confirm(tmp_path, ROOT, FP, run + 1, "proof")
    with FileCache.open(tmp_path, ROOT, FP) as cache:
        assert cache.proof == (run + 1, "proof")
    gone = tmp_path / "elsewhere"
    with pytest.raises(sqlite3.OperationalError):  # and never creates a cache file
        filecache.confirm(gone, ROOT, FP, 1, "p")
    assert not gone.exists()


def test_a_proof_stands_until_one_of_its_targets_loses_a_pack(tmp_path: Path) -> None:
    with BlobIndex.open(tmp_path) as index:
        index.add_pack("aa" * 32, [("bb" * 32, 3)], [("s3", 10), ("gcs", 10)])
        losses = index.losses()
        proof = losses.proof(["s3", "gcs"])

        def holds(now: Losses, targets: list[str], p: str | None = proof) -> bool:
            return now.holds(p, targets, floor=now.count)

        assert holds(losses, ["s3"]) and holds(losses, ["s3", "gcs"])
        assert not holds(losses, ["s3", "local"])  # not proven there
        assert not holds(losses, ["s3"], None)
        assert not holds(losses, ["s3"], "{not json")
        index.drop_held("gcs", "aa" * 32)
        after = index.losses()
        assert holds(after, ["s3"]) and not holds(after, ["gcs"])
        assert holds(after, ["gcs"], after.proof(["gcs"]))  # a new proof, after the loss
        # An index gone back (a power cut, an older copy) counts fewer losses than the
        # proof saw: its counts would be handed out again, so no proof of then stands.
        assert not after.holds(after.proof(["s3"]), ["s3"], floor=after.count - 1)
    (tmp_path / "packs" / "index.sqlite").unlink()  # rebuilt: no proof of before stands
    with BlobIndex.open(tmp_path) as index:
        assert not holds(index.losses(), ["s3"])


def test_refs_are_written_sorted_and_unique_across_runs(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RefsWriter, "RUN", 4)
    ids = [f"{i % 7:02x}" * 32 for i in range(30)]
    writer = RefsWriter(tmp_path / "x.ids")
    try:
        writer.add(iter(ids[:10]))  # one call may bring a whole backup's ids: spilled as it goes
        assert len(list(tmp_path.glob(".x.ids.run*"))) == 2
        for i in range(10, 30, 3):
            writer.add_joined(",".join(ids[i:i + 3]))
        writer.add_joined("")
        writer.commit()
    finally:
        writer.close()
    data = (tmp_path / "x.ids").read_bytes()
    assert [data[i:i + 32] for i in range(0, len(data), 32)] == \
        sorted({bytes.fromhex(i) for i in ids})
    assert not list(tmp_path.glob(".x.ids.*"))


def test_a_folder_line_formatted_directly_is_the_json_of_its_fields() -> None:
    import json

    for path in (".", "caf\udce9/\"quoted\"", "tab\there"):
        fields = {"path": path, "type": "dir", "mode": 0o755, "uid": 1, "gid": 2, "mtime_ns": 3}
        assert dir_line(path, 0o755, 1, 2, 3) == json.dumps(fields).encode() + b"\n"
        assert IndexEntry.from_line(dir_line(path, 0o755, 1, 2, 3)) == IndexEntry(
            path, "dir", mode=0o755, uid=1, gid=2, mtime_ns=3)


def test_losses_of_a_target_never_seen_are_nothing() -> None:
    losses = Losses("id", 5, {"s3": 3})
    assert losses.holds(losses.proof(["s3", "new"]), ["new"], floor=5)


def test_a_refs_writer_killed_outright_leaves_nothing_for_long(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(RefsWriter, "RUN", 2)
    with BlobIndex.open(tmp_path) as index:
        killed = RefsWriter(index.refs_path("20261206T000000Z"))
        killed.add(["ab" * 32, "cd" * 32, "ef" * 32])  # spilled runs; then SIGKILL: no close
        refs = tmp_path / "packs" / "refs"
        assert list(refs.glob(".*.run*"))
        with index.refs_writer("20261206T010000Z") as writer:
            writer.add(["ab" * 32])
        assert sorted(p.name for p in refs.iterdir()) == ["20261206T010000Z.ids"]
