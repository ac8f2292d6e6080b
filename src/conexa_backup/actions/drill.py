"""``verify --drill``: prove that a backup restores, completely, within the RTO.

For one backup copy on one target: fetch every artifact (checking SHA-256 as it streams),
restore the database into a throwaway database with errors fatal, prove it complete (every
table's row count as recorded in the dump's snapshot, every schema object, the configured check
queries), extract the uploads into a throwaway folder and prove every file (count, bytes, the
SHA-256 of each file, or of a random sample), and time the whole recovery against
``rto_objective`` (only a drill whose every step passed is timed). Everything it creates is
dropped at the end, also on failure or interrupt. A copy this host cannot decrypt (no age
identity that fits) is not drilled at all: "could not drill", recorded as not run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import psycopg

from conexa_backup import postgres
from conexa_backup.actions import leftovers, preflight, restore_db, restore_uploads
from conexa_backup.actions.context import Context
from conexa_backup.actions.restore_packs import read_index
from conexa_backup.catalog import Backup, Copy, Use, proves_damage
from conexa_backup.durations import parse_duration
from conexa_backup.errors import ConexaError, ConfigError, IntegrityError
from conexa_backup.manifest import IndexEntry, Manifest, shown_path
from conexa_backup.pipeline import copy_stream, hash_file
from conexa_backup.postgres import ConnInfo
from conexa_backup.scratch import scratch_name
from conexa_backup.state import record_drill

log = logging.getLogger(__name__)
RTO_STEP = "recovery time"
NOT_RUN = "not_run"  # a drill's outcome when this host could not drill the copy


@dataclass
class Step:
    name: str
    ok: bool
    seconds: float
    detail: str
    damage: bool = False  # it failed for a cause that proves the copy bad (proves_damage)


@dataclass
class DrillResult:
    backup_id: str
    target: str
    started_at: datetime
    rto_objective_seconds: float
    steps: list[Step] = field(default_factory=list)
    recovery_seconds: float = 0.0
    size_bytes: int | None = None  # the drilled backup's stored bytes (restore estimates)
    # Why this host could not drill the copy at all (no age identity that fits): no step
    # ran, and the drill says nothing about the copy (neither passed nor failed).
    not_run: str | None = None

    @property
    def ok(self) -> bool:
        return self.not_run is None and bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def outcome(self) -> str:
        """``passed``, ``failed`` or ``not_run`` (could not drill here)."""
        if self.not_run is not None:
            return NOT_RUN
        return "passed" if self.ok else "failed"

    @property
    def measured(self) -> bool:
        """Whether the recovery time was judged: only when every other step passed."""
        return any(s.name == RTO_STEP for s in self.steps)

    @property
    def damage(self) -> str | None:
        """Why the copy is damaged (the steps that failed for a cause proving its stored
        bytes bad: a checksum, a missing object, restored data that differs from the
        manifest), or None. A scratch server down, a missing key, a full disk or a recovery
        only slower than the RTO say nothing about the copy."""
        failed = [s for s in self.steps if s.damage]
        if not failed:
            return None
        return "drill: " + "; ".join(f"{s.name}: {(s.detail.strip() or '?').splitlines()[0]}"
                                     for s in failed)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat().replace("+00:00", "Z")
        data["ok"] = self.ok
        data["outcome"] = self.outcome
        return data


class CheckFailed(ConexaError):
    """A configured check query or the RTO failed: the backup restored as stored (its data
    is what was dumped), so this says nothing about the copy being damaged."""


class _Stop(Exception):
    """A failed step: later steps that depend on it cannot run."""


class _Drill:
    """One drill of one copy; collects steps; ``cleanup`` undoes everything it made."""

    def __init__(self, ctx: Context, backup: Backup, copy: Copy, manifest: Manifest) -> None:
        self.ctx, self.backup, self.copy, self.manifest = ctx, backup, copy, manifest
        self.info: ConnInfo = ctx.drill_db
        token = secrets.token_hex(3)
        self.dbname = restore_db.derived_name("conexa_drill", f"_{backup.id}_{token}").lower()
        self.workdir = ctx.state_dir("drills") / scratch_name(
            f"{backup.id}-{copy.target.name}-{token}")
        objective = parse_duration(ctx.config.drill.rto_objective).total_seconds()
        self.result = DrillResult(backup.id, copy.target.name, datetime.now(UTC), objective,
                                  size_bytes=manifest.size_bytes)
        self.record: Path | None = None  # the leftovers record of its database, once made

    def step(self, name: str, action: Callable[[], str], *, critical: bool = True) -> None:
        """Run one step and record it; a failed ``critical`` step raises _Stop (what follows
        depends on it); other failures are recorded and the drill goes on."""
        self.ctx.reporter.step(f"drill {self.backup.id} on {self.copy.target.name}: {name}")
        t0 = time.monotonic()
        damage = False
        try:
            detail, ok = action(), True
        except (ConexaError, psycopg.Error, OSError) as exc:
            detail, ok = str(exc).strip() or repr(exc), False  # whole: pg_restore's context
            damage = proves_damage(exc)
        self.result.steps.append(Step(name, ok, round(time.monotonic() - t0, 3), detail,
                                      damage))
        log.info("drill %s/%s: %s: %s (%s)", self.backup.id, self.copy.target.name, name,
                 "ok" if ok else "FAILED", detail)
        if not ok and critical:
            raise _Stop(name)

    def claim_database(self) -> None:
        """Record the throwaway database before it exists: a drill killed outright leaves it
        to the next locked run (:mod:`leftovers`); its folder is swept from ``drills/``."""
        self.record = leftovers.claim(self.ctx.config.state_dir, "drill",
                                      databases=[("drill", self.dbname)])

    def cleanup(self) -> None:
        """Drop the database (recorded: a failed drop is retried by the next locked run) and
        remove the folder; never raises but for an interrupt."""
        if self.record is not None:
            leftovers.settle(self.record, lambda _role: self.info)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _database_steps(d: _Drill) -> None:
    db = d.manifest.database
    if db is None:
        return
    dump: dict[str, restore_db.StagedDump] = {}
    counted: dict[str, str] = {}

    def fetch() -> str:
        dump["it"] = restore_db.fetch_dump(d.ctx, d.backup, d.copy.target.name)
        return "SHA-256 of every byte verified"

    def restore() -> str:
        staged = dump["it"]
        try:
            # Ours before it exists: the name is this drill's own, and a signal landing just
            # after CREATE DATABASE (before any line below it) would otherwise leave it
            # behind. Dropping one never created is a no-op (DROP ... IF EXISTS).
            d.claim_database()
            # A dump whose data offsets we filled in is counted at once (and restored as
            # stored if that fails); the row counts step then reports that count.
            summary = restore_db.restore_checked(d.info, staged, db, d.dbname, count=False)
            if summary is not None:
                counted["rows"] = summary
        finally:
            staged.discard()
        return (f"pg_restore --exit-on-error -j {d.info.jobs} into a throwaway database, "
                f"{d.info.describe(d.dbname).split(' at ')[-1]}")

    def row_counts() -> str:
        if "rows" in counted:
            return counted["rows"]
        return restore_db.check_row_counts(d.info, d.dbname, db.tables)

    d.step("fetch database", fetch)
    d.step("restore database", restore)
    d.step("row counts", row_counts, critical=False)
    d.step("schema objects", lambda: _check_objects(d.info, d.dbname, db.objects),
           critical=False)
    for query in d.ctx.config.drill.checks:
        d.step(f"check: {query}",
               lambda q=query: _run_check(d.info, d.dbname, q,  # type: ignore[misc]
                                          d.result.rto_objective_seconds),
               critical=False)


def _check_objects(info: ConnInfo, name: str, expected: dict[str, list[str]]) -> str:
    if not expected:
        return "not recorded in this backup's manifest"
    with info.connect(name) as conn:
        actual = postgres.schema_objects(conn)
    problems = [f"missing {kind[:-1]} {obj}" for kind, names in expected.items()
                for obj in sorted(set(names) - set(actual.get(kind, [])))]
    restore_db.fail_if(problems, "restored schema is incomplete")
    return ", ".join(f"{len(v)} {k}" for k, v in expected.items())


def _run_check(info: ConnInfo, name: str, query: str, timeout: float) -> str:
    with info.connect(name) as conn:
        # A check that hangs must not hang the drill: it may take at most the RTO.
        conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        rows = conn.execute(query).fetchall()  # the admin's own SQL, from the config file
    if len(rows) != 1 or len(rows[0]) != 1 or rows[0][0] is not True:
        raise CheckFailed(f"check returned {rows[:3]!r}, expected one true value")
    return "true"


def _uploads_steps(d: _Drill) -> None:
    up = d.manifest.uploads
    if up is None or not restore_uploads.has_uploads(d.manifest):
        return
    folder: dict[str, Path] = {}
    proof = ("every pack read checked against its name, every blob against its id"
             if up.format == "packs" else "SHA-256 of the archive verified")

    def extract() -> str:
        folder["path"] = restore_uploads.extract(d.ctx, d.backup, d.workdir / "uploads",
                                                 d.copy.target.name)
        return f"{up.files} files, {up.bytes} bytes, {up.symlinks} symlinks, {proof}"

    d.step("fetch and extract uploads", extract)
    d.step("uploads files", lambda: _check_files(d, folder["path"]), critical=False)


@contextlib.contextmanager
def _index_file(d: _Drill) -> Iterator[IO[bytes] | None]:
    """The copy's uploads index, decompressed into a private temporary file (read line by
    line: memory flat in the number of files), or None when the backup has none."""
    artifact = d.manifest.artifact("uploads-index")
    if artifact is None:
        yield None
        return
    with tempfile.TemporaryFile(dir=d.ctx.keys().staging, prefix="index-") as plain:
        read_index(d.ctx, d.copy, d.backup.id, d.manifest, lambda src: copy_stream(src, plain))
        plain.seek(0)
        yield plain


@dataclass
class _Problems:
    """The first problems found (named in the message) and how many in all."""

    first: list[str] = field(default_factory=list)
    count: int = 0

    def add(self, problem: str | None) -> None:
        if problem is not None:
            self.count += 1
            if len(self.first) < 5:
                self.first.append(problem)

    def fail(self, what: str) -> None:
        if self.count:
            more = f" (and {self.count - len(self.first)} more)" \
                if self.count > len(self.first) else ""
            raise IntegrityError(f"{what}: " + "; ".join(self.first) + more)


def _check_files(d: _Drill, root: Path) -> str:
    """Every symlink's target, every folder (packs backups list them), and the SHA-256 of
    every file (or a random sample) against the index recorded at backup time; the symlink
    count against the manifest. The index is read line by line, the sample kept by
    reservoir sampling: memory is flat in the number of files."""
    sample = d.ctx.config.drill.uploads_sample
    problems = _Problems()
    files = links = 0
    chosen: list[IndexEntry] = []
    pick = random.SystemRandom()
    with _index_file(d) as index:
        if index is None:
            return "no per-file index in this backup: count and bytes checked at extraction"
        for line in index:
            entry = IndexEntry.from_line(line)
            if entry.type == "dir":
                path = root / entry.path
                if path.is_symlink() or not path.is_dir():
                    problems.add(f"missing folder {shown_path(entry.path)}")
            elif entry.type == "symlink":
                links += 1
                problems.add(_link_problem(root, entry))
            else:
                files += 1
                if not sample:
                    problems.add(_file_problem(root, entry))
                elif len(chosen) < sample:
                    chosen.append(entry)
                elif (slot := pick.randrange(files)) < sample:
                    chosen[slot] = entry
    for entry in chosen:
        problems.add(_file_problem(root, entry))
    up = d.manifest.uploads
    if links and up is not None and links != up.symlinks:
        problems.add(f"index lists {links} symlinks, manifest says {up.symlinks}")
    problems.fail("restored uploads differ from the backup")
    scope = "every file" if not sample or sample >= files else \
        f"a sample of {len(chosen)} of {files}"
    return f"SHA-256 of {scope} matches" + (
        f"; {links} symlinks with their targets" if links else "")


def _file_problem(root: Path, entry: IndexEntry) -> str | None:
    path = root / entry.path
    # Names shown printably: one that is not UTF-8 would break the JSON and JUnit output.
    if path.is_symlink() or not path.is_file():
        return f"missing {shown_path(entry.path)}"
    if path.stat().st_size != entry.size or hash_file(path) != entry.sha256:
        return f"content differs: {shown_path(entry.path)}"
    return None


def _link_problem(root: Path, entry: IndexEntry) -> str | None:
    path = root / entry.path
    if not path.is_symlink():
        return f"missing symlink {shown_path(entry.path)}"
    # os.readlink, not Path.readlink: the text exactly as stored (no normalising).
    target = os.readlink(path)  # noqa: PTH115
    if target != entry.target:
        return (f"symlink {shown_path(entry.path)} points to {target!r}, "
                f"index says {entry.target!r}")
    return None


def drill_copy(ctx: Context, backup: Backup, copy: Copy) -> DrillResult:
    """Drill one copy; never raises for a failed check (see the result's steps).

    A copy this host cannot decrypt (no age identity, or none of its recipients) is not
    drilled: the result says why in ``not_run``, with no step. The recovery time is judged
    only when every other step passed: a failed drill recovered nothing to time.
    """
    assert copy.manifest is not None
    d = _Drill(ctx, backup, copy, copy.manifest)
    try:
        preflight.check_identity(ctx, backup.id, preflight.reads(copy.manifest, database=True,
                                                                 uploads=True))
    except ConfigError as exc:  # no identity, none that fits, or one that cannot be read
        d.result.not_run = str(exc)
        log.warning("could not drill %s on %s: %s", backup.id, copy.target.name, exc)
        return d.result
    t0 = time.monotonic()
    try:
        for part in (_database_steps, _uploads_steps):  # independent: report both
            with contextlib.suppress(_Stop):
                part(d)
        d.result.recovery_seconds = round(time.monotonic() - t0, 3)
        objective = d.result.rto_objective_seconds
        if all(s.ok for s in d.result.steps):
            d.step(RTO_STEP, lambda: _check_rto(d.result.recovery_seconds, objective),
                   critical=False)
    finally:
        d.cleanup()
    return d.result


def _check_rto(seconds: float, objective: float) -> str:
    verdict = f"{seconds:.1f} s (objective {objective:.0f} s)"
    if seconds > objective:
        raise CheckFailed(f"recovery took {verdict}: RTO exceeded")
    return verdict


def run_drills(ctx: Context, ref: str, *, source: str | None = None, all_targets: bool = False,
               notes: list[str] | None = None) -> list[DrillResult]:
    """Drill the copy on ``source`` (default: the first target holding one), or on every target.
    ``latest`` is the newest complete backup as it is (damaged or suspect too: drilling it is
    how damage is re-checked); its copies not known damaged are drilled first.

    Raises:
        UsageError: no such backup, or no complete copy on the named target.
    """
    backup = ctx.resolve(ref, source, notes, use=Use.CHECK)
    # Copies not known damaged first, as a restore would read them (fetch.from_first_good).
    copies = sorted(backup.complete_copies, key=lambda c: c.state == "damaged")
    if source is not None:
        copies = [c for c in copies if c.target.name == source]
    elif not all_targets:
        copies = copies[:1]
    results = [drill_copy(ctx, backup, copy) for copy in copies]
    record(ctx, results)
    return results


def record(ctx: Context, results: list[DrillResult]) -> None:
    """Keep drill results in ``state_dir/drills.json`` and as ``drill.json`` beside the copy
    (a drill that could not run: in ``drills.json`` only, as such)."""
    for result in results:
        data = result.to_dict()
        record_drill(ctx.config.state_dir, data, result.damage)
        if result.not_run is not None:
            continue  # the copy's own record keeps saying what was last proven of it
        target = next(t for t in ctx.targets() if t.name == result.target)
        try:
            upload = target.writer(f"{result.backup_id}/drill.json")
            upload.write(json.dumps(data, indent=2).encode())
            upload.commit()
        except ConexaError as exc:  # the result itself is what matters; say so, carry on
            log.warning("could not store the drill result beside the backup: %s", exc)
