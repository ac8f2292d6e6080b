"""``prune``: apply each target's retention policy (see ``retention.py`` for the rules).

The plan comes from the pure planner; this module only lists, decides what may be touched, and
deletes (manifest first). It never deletes objects the tool did not write, and it skips a target
it was told not to touch (one whose backup just failed). On S3 it then sweeps what the bucket
keeps beside (``sweep.py``): hidden versions whose lock has ended, abandoned uploads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from conexa_backup.actions.context import Context
from conexa_backup.actions.gc import GcReport, gc_target
from conexa_backup.actions.inspect import delete_copy
from conexa_backup.actions.sweep import abort_stale_uploads, sweep_versions
from conexa_backup.blobindex import BlobIndex
from conexa_backup.catalog import Backup, Copy
from conexa_backup.errors import ConexaError
from conexa_backup.retention import Candidate, Decision, floors, plan
from conexa_backup.state import checks, forget_copies
from conexa_backup.storage.base import Target
from conexa_backup.storage.s3 import S3Target, S3TargetConfig

log = logging.getLogger(__name__)
UNREADABLE = "manifest unreadable: kept for inspection"


@dataclass
class TargetPrune:
    """One target's plan and what was done about it."""

    target: str
    decisions: list[Decision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)  # gone for good (from the bucket too)
    # Deleted, but the bucket keeps the versions behind delete markers (a versioned bucket):
    # id -> until when Object Lock keeps them (None: no lock, versioning alone keeps them).
    # A dry run fills it from the target's object_lock_* config for the copies it would delete.
    hidden: dict[str, datetime | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the target was not pruned at all
    gc: GcReport | None = None  # garbage collection of packs, when the target has any
    expired_versions: int = 0  # hidden versions of ours whose lock ended: removed (would be)
    aborted_uploads: int = 0  # our multipart uploads older than a day: aborted (would be)
    warnings: list[str] = field(default_factory=list)  # housekeeping that failed (not errors)

    def gone(self) -> list[str]:
        """The backups no longer listed on this target after this prune: deleted or hidden."""
        return [*self.deleted, *self.hidden]


def problems(results: Sequence[TargetPrune]) -> list[str]:
    """Every deletion that failed (backups, and packs), as ``target: why``."""
    return [f"{p.target}: {e}" for p in results
            for e in [*p.errors, *(p.gc.errors if p.gc else [])]]


def candidates(backups: Sequence[Backup], target: str) -> tuple[list[Candidate], dict[str, Copy]]:
    """What the planner needs of every backup on ``target``, and the copies by id."""
    cands, copies = [], {}
    for backup in backups:
        for copy in backup.copies:
            if copy.target.name != target:
                continue
            if copy.problem is not None:
                continue  # a manifest we cannot read: never delete what we cannot judge
            if not copy.owned_keys(backup.id):
                continue  # only files we did not write: not a backup, nothing of ours to do
            kind = copy.manifest.kind if copy.manifest is not None else "scheduled"
            # A suspect backup (uploads empty or shrunken: a volume not mounted) is as bad as
            # a damaged copy (Backup.trusts): never the newest good one, nor a period's while
            # a good one is.
            bad = not backup.trusts(copy)
            cands.append(Candidate(backup.id, copy.complete, kind, bad))
            copies[backup.id] = copy
    return cands, copies


def verified_here(ctx: Context, target: str) -> list[str]:
    """The newest backup whose copy *on this target* passed a verify or drill (and was not
    found damaged since), if any: the one a restore from this target can count on."""
    return [p for p in [checks(ctx.config.state_dir).newest_passed(target)] if p]


def must_keep(ctx: Context, backups: Sequence[Backup], backup_id: str, target: str, *,
              now: datetime) -> str | None:
    """Why the copy of ``backup_id`` on ``target`` must stay whatever a person asks, or None
    when it may be deleted: what ``delete`` refuses and prune always keeps.

    Per target, as prune judges: a manifest that cannot be read (kept for inspection), the
    newest complete copy there, the newest good one, the newest verified one
    (:func:`retention.floors`). Also an S3 copy still under Object Lock: deleting it would
    only hide it behind a delete marker, the locked version staying (and billed) until its
    date. Prune, unlike a person, may do that: it is retention's scheduled delete, and the
    lock ends about when retention lets the copy go.
    """
    copy = next((c for b in backups if b.id == backup_id for c in b.copies
                 if c.target.name == target), None)
    if copy is None:
        return None
    if copy.problem is not None:
        return UNREADABLE
    held = floors(candidates(backups, target)[0], verified_here(ctx, target)).reasons(backup_id)
    if held:
        return "; ".join(held)
    lock = _lock(ctx, copy)
    if lock is not None and lock[1] > now:
        return (f"object-locked ({lock[0]}) until "
                f"{lock[1].isoformat(timespec='seconds').replace('+00:00', 'Z')}: the "
                f"bucket keeps it until then")
    return None


def _lock(ctx: Context, copy: Copy) -> tuple[str, datetime] | None:
    """The Object Lock mode of ``copy``'s target and until when it keeps the copy, as the
    target's config says (None: the target does not lock)."""
    config = next((t for t in ctx.config.targets if t.name == copy.target.name), None)
    if not isinstance(config, S3TargetConfig) or config.object_lock_mode is None:
        return None
    stored = [o.modified for o in copy.objects]
    newest = max((t for t in stored if t is not None), default=None)
    until = config.locked_until(None if None in stored else newest)
    return None if until is None else (config.object_lock_mode, until)


def prune_target(ctx: Context, target: Target, backups: Sequence[Backup], *, now: datetime,
                 dry_run: bool) -> TargetPrune:
    """Plan and (unless ``dry_run``) apply retention on one target; on S3, then sweep
    (:func:`_sweep`)."""
    result = TargetPrune(target.name)
    policy = ctx.config.retention_for(target.name).policy()
    cands, copies = candidates(backups, target.name)
    result.decisions = plan(cands, policy, now, verified_here(ctx, target.name))
    damaged = [b.id for b in backups for c in b.copies
               if c.target.name == target.name and c.problem is not None]
    result.decisions += [Decision(i, True, [UNREADABLE]) for i in damaged]
    if not dry_run:
        _delete(ctx, target, copies, result)
    if isinstance(target, S3Target):
        _sweep(ctx, target, copies, result, now=now, dry_run=dry_run)
    if uses_packs(ctx, backups, target.name):
        ctx.reporter.step(f"collecting packs on {target.name}")
        gone = result.gone() if not dry_run else [d.id for d in result.decisions if not d.keep]
        result.gc = gc_target(ctx, target, backups, set(gone), now=now, dry_run=dry_run)
    return result


def uses_packs(ctx: Context, backups: Sequence[Backup], target: str) -> bool:
    """Whether packs garbage collection concerns ``target``: uploads are stored as packs,
    or some backup there was."""
    if ctx.config.uploads is not None and ctx.config.uploads.format == "packs":
        return True
    return any(c.manifest is not None and c.manifest.uploads is not None
               and c.manifest.uploads.format == "packs"
               for b in backups for c in b.copies if c.target.name == target)


def _delete(ctx: Context, target: Target, copies: dict[str, Copy], result: TargetPrune) -> None:
    """Delete the copies the plan lets go (manifest first), recording what happened."""
    for decision in result.decisions:
        if decision.keep:
            continue
        try:
            delete_copy(copies[decision.id], decision.id)
            forget_copies(ctx.config.state_dir, [(decision.id, target.name)])
            result.deleted.append(decision.id)
            log.info("pruned %s from %s (%s)", decision.id, target.name, decision.reason)
        except ConexaError as exc:
            result.errors.append(f"{decision.id}: {exc}")
            log.error("prune %s on %s: %s", decision.id, target.name, exc)


def _sweep(ctx: Context, target: S3Target, copies: dict[str, Copy], result: TargetPrune, *,
           now: datetime, dry_run: bool) -> None:
    """An S3 target's housekeeping (``sweep.py``), and the truth about this run's deletes:
    a copy whose versions the bucket still keeps was hidden, not deleted. A dry run cannot
    ask the bucket about copies it has not deleted: it says what the lock config implies."""
    ctx.reporter.step(f"looking for hidden versions and abandoned uploads on {target.name}")
    swept = sweep_versions(target, now, dry_run=dry_run)
    if dry_run:
        for decision in (d for d in result.decisions if not d.keep and d.id in copies):
            lock = _lock(ctx, copies[decision.id])
            if lock is not None and lock[1] > now:
                result.hidden[decision.id] = lock[1]
    else:
        for backup_id in [i for i in result.deleted if i in swept.hidden]:
            result.deleted.remove(backup_id)
            result.hidden[backup_id] = swept.hidden[backup_id]
    result.expired_versions = swept.expired
    result.aborted_uploads, warnings = abort_stale_uploads(target, now, dry_run=dry_run)
    result.warnings += [*swept.warnings, *warnings]
    for warning in result.warnings:
        log.warning("prune %s: %s", target.name, warning)


def prune(ctx: Context, target_names: Sequence[str] | None = None, *, dry_run: bool = False,
          at: datetime | None = None, skip: dict[str, str] | None = None) -> list[TargetPrune]:
    """Prune the selected targets as of ``at`` (default now); the caller holds the lock.

    ``skip`` names targets that must not be touched, with the reason (e.g. the backup of
    this run failed there). A target that cannot be listed is reported, not pruned.
    """
    now = at or datetime.now(UTC)
    targets = ctx.targets(target_names)
    unreachable: dict[str, str] = {}
    backups = ctx.scan(targets, unreachable=unreachable)
    results = []
    for target in targets:
        why = (skip or {}).get(target.name) or unreachable.get(target.name)
        if why:
            results.append(TargetPrune(target.name, skipped=why))
            continue
        ctx.reporter.step(f"pruning {target.name}")
        results.append(prune_target(ctx, target, backups, now=now, dry_run=dry_run))
    if not dry_run and not unreachable and len(targets) == len(ctx.all_targets) \
            and any(r.gc is not None for r in results):
        _forget_refs(ctx, backups, results)
    return results


def _forget_refs(ctx: Context, backups: Sequence[Backup], results: Sequence[TargetPrune]) -> None:
    """Drop the cached blob ids of backups left on no target. Only after every target was
    listed: a backup seen nowhere because a target was down may still be there."""
    deleted = {(i, r.target) for r in results for i in r.gone()}
    keep = [b.id for b in backups if any((b.id, c.target.name) not in deleted for c in b.copies)]
    try:
        with BlobIndex.open(ctx.config.state_dir) as index:
            index.forget_refs(keep)
    except (OSError, ConexaError) as exc:  # a cache: stale files cost disk, not safety
        log.warning("could not remove the blob ids of deleted backups: %s", exc)
