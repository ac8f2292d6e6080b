"""``delete``: remove one backup's copies, except those prune would always keep.

The rule for what must stay is :func:`actions.prune.must_keep` (the same floors prune plans
with); this module only applies it copy by copy and deletes the rest, manifest first. The
caller holds the run lock, so no backup or prune runs meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from conexa_backup.actions.context import Context
from conexa_backup.actions.inspect import delete_copy
from conexa_backup.actions.prune import must_keep
from conexa_backup.errors import BackupNotFoundError, StorageError, UsageError
from conexa_backup.state import forget_copies

log = logging.getLogger(__name__)


@dataclass
class Deletion:
    """What a delete did: copies deleted, copies kept (target -> why), targets not listed."""

    backup_id: str
    deleted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"backupId": self.backup_id, "deleted": self.deleted, "kept": self.kept,
                "unreachable": self.unreachable}


def delete(ctx: Context, backup_id: str, target_names: Sequence[str] | None = None, *,
           force: bool = False, at: datetime | None = None) -> Deletion:
    """Delete backup ``backup_id`` (complete or not) from the selected targets, judging each
    copy on its own target: a copy :func:`must_keep` names a reason for is kept (unless
    ``force``), the others are deleted. The manifest goes first, so an interrupted delete
    leaves an incomplete backup, never a "complete" one with files missing.

    Raises:
        UsageError: ``latest`` (deleting needs an explicit id), or an unknown target name.
        BackupNotFoundError: no copy of it on the selected targets, all listed.
        StorageError: no copy of it on the targets listed and some could not be, or one
            refused a delete (what was deleted stays deleted).
    """
    if backup_id == "latest":
        raise UsageError("delete needs an explicit backup id, not 'latest'")
    result = Deletion(backup_id)
    backups = ctx.scan(ctx.targets(target_names), unreachable=result.unreachable)
    found = next((b for b in backups if b.id == backup_id), None)
    if found is None and result.unreachable:  # it may be there: not "no such backup"
        name, error = next(iter(result.unreachable.items()))
        raise StorageError(name, f"cannot be listed, and no other target holds backup "
                                 f"{backup_id} ({error})")
    if found is None:
        raise BackupNotFoundError(f"no backup with id {backup_id!r} (see `conexa-backup list`)")
    now = at or datetime.now(UTC)
    for copy in found.copies:
        name = copy.target.name
        why = None if force else must_keep(ctx, backups, backup_id, name, now=now)
        if why is not None:
            result.kept[name] = why
            continue
        delete_copy(copy, backup_id)
        forget_copies(ctx.config.state_dir, [(backup_id, name)])
        result.deleted.append(name)
        log.info("deleted backup %s from %s%s", backup_id, name, " (forced)" if force else "")
    return result
