"""Property tests of packs garbage collection (issue 15) on random histories.

A history is a sequence of backups (each naming a random set of blobs; a backup stores the
blobs the target lacks, as a backup run does, and may fail before its manifest), deletions
of backups, a clock moving on, a lost cache, and garbage collections, some killed at a random
step (an exception raised there: what is on the target and in the cache is what SIGKILL
leaves; tests/test_gc.py kills real processes). After every step: no remaining backup lacks a
blob in the packs really on the target. After every GC that ran to its end: no pack older
than the grace period is unreferenced, nor more unreferenced than the threshold.

No database: the backups are the GC's inputs (refs and packs), made directly, on a local
target, with a fake clock (pack ages set with os.utime).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conexa_backup import packs
from conexa_backup.actions import backup_packs, gc
from conexa_backup.actions.context import Context
from conexa_backup.blobindex import BlobIndex
from conexa_backup.config import load_config
from conexa_backup.storage.base import Target

UNIVERSE = [hashlib.sha256(b"%d" % i).digest() * (1 + i % 3) for i in range(12)]
IDS = [packs.blob_id(data) for data in UNIVERSE]
GRACE = timedelta(hours=24)
THRESHOLD = 0.3


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except clause of ours catches it)."""


class World:
    """A local target, a state_dir, the backups that exist, and a fake clock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.target_dir = root / "target"
        (root / "uploads").mkdir(parents=True)
        config = root / "backup.toml"
        config.write_text(
            f'state_dir = "{root / "state"}"\n'
            '[database]\nurl = "postgresql://nobody@127.0.0.1:1/none"\n'
            f'[uploads]\npath = "{root / "uploads"}"\nformat = "packs"\n'
            f'gc_grace = "24h"\nrepack_threshold = {THRESHOLD}\n'
            f'[[targets]]\nname = "local"\ntype = "local"\npath = "{self.target_dir}"\n',
            encoding="utf-8")
        self.ctx = Context(load_config(config)[0])
        self.target: Target = self.ctx.targets()[0]
        self.live: dict[str, set[int]] = {}
        self.serial = 0
        self.now = datetime.now(UTC) - timedelta(days=365)
        self.contents: dict[str, set[str]] = {}  # pack name -> blob ids (read once)

    def index(self) -> BlobIndex:
        return BlobIndex.open(self.ctx.config.state_dir)

    def stamp_new_packs(self) -> None:
        """Packs written since the last step get the fake clock's time."""
        when = self.now.timestamp()
        for path in self.pack_files():
            if path.stat().st_mtime > when + 60:
                os.utime(path, (when, when))

    def pack_files(self) -> Iterator[Path]:
        folder = self.target_dir / "packs"
        return (p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else iter(())

    def backup(self, blobs: set[int], commit: bool) -> None:
        """What a backup run does to packs: store the blobs the target lacks, then (unless it
        fails first) record its refs; its manifest makes it one of ``live``."""
        with self.index() as index:
            index.sync(self.target, backup_packs.index_reader(self.ctx, self.target))
            with packs.PackWriter(self.ctx.state_dir("staging"),
                                  lambda p: gc.upload_pack(self.target, index, p),
                                  pack_size=200) as writer:
                for i in sorted(blobs):
                    if not index.has("local", IDS[i]):
                        writer.add(IDS[i], UNIVERSE[i])
            self.serial += 1
            backup_id = f"b{self.serial:04d}"
            if commit:
                index.write_refs(backup_id, [IDS[i] for i in blobs])
                self.live[backup_id] = set(blobs)
        self.stamp_new_packs()

    def collect(self, crash_at: int | None) -> gc.GcReport | None:
        """One GC as prune runs it, killed at step ``crash_at`` when given."""
        steps = [0]

        def step() -> None:
            steps[0] += 1
            if steps[0] == crash_at:
                raise Crash

        def around(inner: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                step()
                result = inner(*args, **kwargs)
                step()
                return result
            return wrapped

        with pytest.MonkeyPatch.context() as mp:
            for owner, name in [(gc, "upload_pack"), (gc, "delete_pack"),
                                (BlobIndex, "add_pack"), (BlobIndex, "drop_held")]:
                mp.setattr(owner, name, around(getattr(owner, name)))
            try:
                with self.index() as index:
                    index.sync(self.target, backup_packs.index_reader(self.ctx, self.target))
                    report = gc.collect(self.ctx, index, self.target, sorted(self.live),
                                        now=self.now, dry_run=False)
            except Crash:
                report = None
        self.stamp_new_packs()
        return report

    def stored(self) -> dict[str, tuple[set[str], float]]:
        """Every pack really on the target: its blobs (read and checked) and its mtime."""
        found = {}
        for path in self.pack_files():
            name = path.name
            if name not in self.contents:
                with path.open("rb") as fh, \
                        packs.open_pack(name, fh, self.ctx.state_dir("staging")) as reader:
                    self.contents[name] = {blob for blob, _ in reader.blobs()}
            found[name] = (self.contents[name], path.stat().st_mtime)
        return found

    def check_whole(self) -> None:
        have = set().union(*(blobs for blobs, _ in self.stored().values()))
        for backup_id, blobs in self.live.items():
            missing = {IDS[i] for i in blobs} - have
            assert not missing, f"backup {backup_id} lacks {len(missing)} blob(s)"

    def check_collected(self) -> None:
        """After a GC that ran to its end: nothing old is (mostly) unreferenced."""
        referenced = {IDS[i] for blobs in self.live.values() for i in blobs}
        sizes = {IDS[i]: len(UNIVERSE[i]) for i in range(len(UNIVERSE))}
        for name, (blobs, mtime) in self.stored().items():
            if self.now.timestamp() - mtime < GRACE.total_seconds():
                continue
            total = sum(sizes[b] for b in blobs)
            dead = sum(sizes[b] for b in blobs - referenced)
            assert blobs & referenced, f"pack {name} unreferenced past the grace period"
            assert dead / total <= THRESHOLD, f"pack {name} {dead / total:.0%} unreferenced"


# A round: a backup (its blobs; whether it reached its manifest), some deletions, the clock
# moving on, maybe a lost cache, then a GC (killed at a step, or not).
rounds = st.lists(st.tuples(
    st.sets(st.integers(0, len(UNIVERSE) - 1), min_size=1, max_size=8),
    st.booleans() | st.just(True),
    st.lists(st.integers(0, 20), max_size=2),
    st.integers(0, 40),
    st.integers(0, 3).map(lambda n: n == 0),
    st.none() | st.integers(1, 10),
), min_size=2, max_size=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(history=rounds)
def test_gc_never_loses_a_blob_and_collects_within_one_prune(history: list[Any]) -> None:
    root = Path(tempfile.mkdtemp(prefix="gc-history-"))
    try:
        world = World(root)
        for blobs, commit, deletes, hours, lose_cache, crash_at in history:
            world.backup(blobs, commit)
            world.check_whole()
            for pick in deletes:
                if world.live:
                    del world.live[sorted(world.live)[pick % len(world.live)]]
            world.now += timedelta(hours=hours)
            if lose_cache:
                for path in (root / "state" / "packs").glob("index.sqlite*"):
                    path.unlink()
            collected(world, crash_at)
        world.now += GRACE
        collected(world, None)  # past the grace period, one more prune collects everything
    finally:
        shutil.rmtree(root, ignore_errors=True)


def collected(world: World, crash_at: int | None) -> None:
    report = world.collect(crash_at)
    world.check_whole()
    if report is not None:
        assert not report.errors, report.errors
        world.check_collected()


def test_the_referenced_set_is_the_union_of_many_refs_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "_MERGE_FILES", 2)  # five files: merged in three groups
    chosen = [sorted({hashlib.sha256(b"%d" % (i * k % 17)).digest() for i in range(9)})
              for k in range(1, 6)]
    with gc.Referenced(tmp_path, [lambda ids=ids: iter(ids) for ids in chosen]) as refs:
        union = set().union(*chosen)
        assert len(refs) == len(union)
        assert all(raw.hex() in refs for raw in union)
        assert hashlib.sha256(b"none").hexdigest() not in refs
    assert list(tmp_path.iterdir()) == []  # its scratch file is gone
