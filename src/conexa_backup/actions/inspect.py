"""``list``, ``status``, ``verify`` and ``download``: backups as they are stored (and the
one way to delete a copy's objects, for ``delete`` and ``prune``)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conexa_backup.actions.context import Context
from conexa_backup.actions.fetch import (
    from_first_good,
    local_writes,
    read_verified,
    save_verified,
)
from conexa_backup.catalog import Backup, Copy, Use, proves_damage, resolve
from conexa_backup.errors import (
    ConfigError,
    IntegrityError,
    StorageError,
    UnusableCopyError,
    UsageError,
)
from conexa_backup.manifest import MANIFEST_NAME, Manifest
from conexa_backup.pipeline import copy_stream
from conexa_backup.state import record_damaged, record_verified

if TYPE_CHECKING:  # the packs machinery: loaded by verify and download, not by list
    from conexa_backup.actions.restore_packs import PackRun

log = logging.getLogger(__name__)


def list_backups(ctx: Context, target_names: Sequence[str] | None = None,
                 unreachable: dict[str, str] | None = None) -> list[Backup]:
    """Every backup on the selected targets, oldest first (incomplete ones included).

    Targets that cannot be listed are recorded in ``unreachable``.
    """
    return ctx.scan(ctx.targets(target_names), unreachable=unreachable)


@dataclass
class CopyCheck:
    """The result of re-reading one backup's copy on one target."""

    backup_id: str
    target: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    bytes_read: int = 0
    damage: list[str] = field(default_factory=list)  # the problems that prove the copy bad


def _verify_copy(ctx: Context, copy: Copy, backup_id: str, run: PackRun) -> CopyCheck:
    check = CopyCheck(backup_id, copy.target.name, ok=True)
    if copy.manifest is None:
        check.ok = False
        check.problems.append(copy.problem or "no manifest: incomplete copy")
        return check
    for artifact in copy.manifest.artifacts:
        try:
            read_verified(copy, backup_id, artifact, lambda raw: copy_stream(raw, _Discard()))
            check.bytes_read += artifact.size
        except (IntegrityError, StorageError) as exc:
            check.ok = False
            check.problems.append(str(exc))
            if proves_damage(exc):  # a timeout or a 503 says nothing about the stored bytes
                check.damage.append(str(exc))
    up = copy.manifest.uploads
    if up is not None and up.format == "packs" and check.ok:
        _verify_packs(ctx, copy, backup_id, run, check)
    return check


def _verify_packs(ctx: Context, copy: Copy, backup_id: str, run: PackRun,
                  check: CopyCheck) -> None:
    """A packs-format copy: also every pack holding its blobs on the copy's target, and
    every blob its index names (:func:`verify_packs.verify_copy`)."""
    assert copy.manifest is not None
    before = run.bytes_read
    try:
        from conexa_backup.actions import verify_packs
        verify_packs.verify_copy(ctx, backup_id, copy, copy.manifest, run)
    except ConfigError:  # a backup host holds no identity: check the stored bytes only
        _verify_stored(ctx, copy, backup_id, run, check)
    except (IntegrityError, StorageError, UnusableCopyError) as exc:
        check.ok = False
        check.problems.append(str(exc))
        if proves_damage(exc):
            check.damage.append(str(exc))
    check.bytes_read += run.bytes_read - before


def _verify_stored(ctx: Context, copy: Copy, backup_id: str, run: PackRun,
                   check: CopyCheck) -> None:
    """An encrypted packs copy where no identity is configured: see
    :func:`verify_packs.verify_stored`; what it could not check is said in ``problems``
    without failing the copy."""
    try:
        from conexa_backup.actions import verify_packs
        check.problems.append(verify_packs.verify_stored(ctx, backup_id, copy, run))
    except (IntegrityError, StorageError) as exc:
        check.ok = False
        check.problems.append(str(exc))
        if proves_damage(exc):
            check.damage.append(str(exc))


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def verify(ctx: Context, ref: str | None, *, all_backups: bool = False,
           target_names: Sequence[str] | None = None,
           notes: list[str] | None = None) -> list[CopyCheck]:
    """Re-read every artifact of the chosen backup(s) on each target and check the manifest.

    With ``all_backups``, incomplete leftovers (no manifest, no problem) are skipped; a named
    backup (or ``latest``: the newest as it is, damaged or suspect too, said in ``notes``)
    reports every copy, incomplete ones as failures.

    Raises:
        UsageError: no such backup.
    """
    unreachable: dict[str, str] = {}
    backups = ctx.scan(ctx.targets(target_names), unreachable=unreachable, fresh=True)
    if all_backups:
        chosen = [b for b in backups if b.complete_copies or any(c.problem for c in b.copies)]
    else:
        chosen = [resolve(backups, ref or "latest", notes, use=Use.CHECK)]
    results = []
    from conexa_backup.actions.restore_packs import PackRun
    run = PackRun()  # each target's packs listed once, each pack read at most once
    for backup in chosen:
        for copy in backup.copies:
            if copy.manifest is None and copy.problem is None and all_backups:
                continue  # an incomplete leftover, not a copy anyone relies on
            ctx.reporter.step(f"verifying {backup.id} on {copy.target.name}")
            check = _verify_copy(ctx, copy, backup.id, run)
            if check.ok:  # the newest verified backup is protected from pruning
                record_verified(ctx.state_dir(), backup.id, copy.target.name)
            elif check.damage:  # damaged until a later verify or drill passes
                record_damaged(ctx.state_dir(), backup.id, copy.target.name,
                               "verify: " + "; ".join(check.damage))
            results.append(check)
    for name, error in unreachable.items():  # a copy we cannot read is not a verified copy
        results.append(CopyCheck("-", name, ok=False, problems=[error]))
    return results


def download(ctx: Context, ref: str, dest: Path, source: str | None = None,
             notes: list[str] | None = None,
             read_from: dict[str, str] | None = None) -> tuple[str, Path]:
    """Fetch a backup's files as stored (plus manifest) into ``dest/<id>/``, checked; for a
    packs-format backup also the packs its uploads need, as stored, under
    ``dest/<id>/packs/<2 hex>/<name>`` (docs/packs.md, "By hand").
    ``latest`` is the newest as it is (damaged or suspect too, said in ``notes``).
    ``read_from`` gets each file's name (``packs/`` for the packs) -> the target it came from.

    Raises:
        UsageError: no such backup, or the folder already exists.
        IntegrityError: no copy matches its manifest.
    """
    backup = ctx.resolve(ref, source, notes, use=Use.CHECK)
    out = dest / backup.id
    if out.exists():
        raise UsageError(f"{out} already exists")

    def attempt(copy: Copy, manifest: Manifest) -> Path:
        with local_writes(dest):
            out.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            for artifact in manifest.artifacts:
                ctx.reporter.step(f"downloading {artifact.name} from {copy.target.name}")
                save_verified(copy, backup.id, artifact, out / artifact.name)
            if manifest.uploads is not None and manifest.uploads.format == "packs":
                ctx.reporter.step(f"downloading the packs it needs from {copy.target.name}")
                from conexa_backup.actions import verify_packs
                with local_writes(dest):
                    verify_packs.download_packs(ctx, backup.id, copy, manifest,
                                                 out / "packs")
            manifest_path = out / MANIFEST_NAME
            manifest_path.write_bytes(manifest.to_json())
            manifest_path.chmod(0o600)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        if read_from is not None:
            names = [a.name for a in manifest.artifacts] + [MANIFEST_NAME] + (
                ["packs/"] if manifest.uploads is not None
                and manifest.uploads.format == "packs" else [])
            read_from.update(dict.fromkeys(names, copy.target.name))
        return out

    return backup.id, from_first_good(backup, attempt, prefer=source)


def delete_copy(copy: Copy, backup_id: str) -> None:
    """Delete the objects we wrote for one backup on one target, manifest first.

    An interrupted delete thus leaves an incomplete backup (removed by a later prune), never
    one listed as complete with files missing. Objects we did not write are left alone.

    Raises:
        StorageError: the target refused; what was deleted stays deleted.
    """
    for key in copy.owned_keys(backup_id):
        copy.target.delete(key)
