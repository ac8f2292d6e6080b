"""What the targets hold: backups grouped by id, complete only where a manifest is stored.

Only keys shaped ``<backup id>/<name>`` are ours; anything else on a target is ignored (and so
never listed, restored or deleted).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from conexa_backup.errors import ConexaError, IntegrityError, StorageError, UsageError
from conexa_backup.manifest import ID_PATTERN, MANIFEST_NAME, Manifest, id_sort_key
from conexa_backup.storage.base import ObjectInfo, Target

log = logging.getLogger(__name__)


@dataclass
class Copy:
    """One backup's objects on one target."""

    target: Target
    objects: list[ObjectInfo]
    manifest: Manifest | None = None
    problem: str | None = None  # why a copy with a manifest file is still not usable

    @property
    def complete(self) -> bool:
        return self.manifest is not None


@dataclass
class Backup:
    """One backup id across every target."""

    id: str
    copies: list[Copy] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest | None:
        return next((c.manifest for c in self.copies if c.manifest is not None), None)

    @property
    def complete_copies(self) -> list[Copy]:
        return [c for c in self.copies if c.complete]

    @property
    def status(self) -> str:
        return "complete" if self.complete_copies else "incomplete"


def read_manifest(target: Target, backup_id: str) -> Manifest:
    """Read and validate ``<id>/manifest.json`` from ``target``.

    Raises:
        ObjectNotFoundError: no manifest there. IntegrityError: unreadable manifest.
    """
    key = f"{backup_id}/{MANIFEST_NAME}"
    with target.open(key) as fh:
        data = fh.read(16 << 20)  # a manifest is a few KB; refuse to slurp anything huge
    manifest = Manifest.from_json(data, f"target {target.name!r}: {key}")
    if manifest.id != backup_id:
        raise IntegrityError(f"target {target.name!r}: {key} describes backup {manifest.id}")
    return manifest


def scan(targets: Sequence[Target], *, with_manifests: bool = True,
         unreachable: dict[str, str] | None = None) -> list[Backup]:
    """Every backup id found on ``targets``, oldest first.

    A target that cannot be listed is skipped (one dead target must not hide the copies on
    the others) and its error recorded in ``unreachable`` when given.

    Raises:
        StorageError: every target failed to list (the first target's error).
    """
    backups: dict[str, Backup] = {}
    failed: dict[str, StorageError] = {}
    for target in targets:
        grouped: dict[str, list[ObjectInfo]] = defaultdict(list)
        try:
            for obj in target.list():
                backup_id, sep, name = obj.key.partition("/")
                if sep and "/" not in name and ID_PATTERN.match(backup_id):
                    grouped[backup_id].append(obj)
        except StorageError as exc:
            log.warning("%s", exc)
            failed[target.name] = exc
            continue
        for backup_id, objects in grouped.items():
            copy = Copy(target, objects)
            has_manifest = any(o.key == f"{backup_id}/{MANIFEST_NAME}" for o in objects)
            if has_manifest and with_manifests:
                try:
                    copy.manifest = read_manifest(target, backup_id)
                except ConexaError as exc:
                    copy.problem = str(exc)
                    log.warning("%s", exc)
            backups.setdefault(backup_id, Backup(backup_id)).copies.append(copy)
    if targets and len(failed) == len(targets):
        raise next(iter(failed.values()))
    if unreachable is not None:
        unreachable.update({name: str(exc) for name, exc in failed.items()})
    return [backups[k] for k in sorted(backups, key=id_sort_key)]


def resolve(backups: Sequence[Backup], ref: str) -> Backup:
    """The complete backup named by ``ref``: an id, or ``latest`` (newest scheduled backup).

    ``latest`` skips safety backups (taken just before a restore, of the state being
    replaced), so that ``restore latest`` run twice never restores the bad state.

    Raises:
        UsageError: no such backup, or it has no complete copy.
    """
    complete = [b for b in backups if b.complete_copies]
    if ref == "latest":
        scheduled = [b for b in complete if b.manifest and b.manifest.kind == "scheduled"]
        if not scheduled:
            raise UsageError("no complete backup found on any target")
        return scheduled[-1]
    for backup in backups:
        if backup.id == ref:
            if not backup.complete_copies:
                raise UsageError(f"backup {ref} is incomplete (no manifest on any target)")
            return backup
    raise UsageError(f"no backup with id {ref!r} (see `conexa-backup list`)")
