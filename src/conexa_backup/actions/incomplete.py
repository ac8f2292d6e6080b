"""Incomplete copies: some of a backup's files on a target and no manifest.

A backup killed before its commit, or a prune killed half-way through deleting a copy (the
manifest goes first), leaves them. Prune removes them once their id is a day old
(``retention.LEFTOVER_AGE``: a younger one may be a backup still being written); until then
``list`` and ``status`` count and size them, so that the disk they take is never a surprise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from conexa_backup.catalog import Backup
from conexa_backup.retention import LEFTOVER_AGE, id_time


@dataclass(frozen=True)
class Incomplete:
    """How many incomplete copies, their stored bytes, and when prune may remove the last
    of them (None when there are none)."""

    copies: int = 0
    bytes: int = 0
    removed_after: datetime | None = None

    def describe(self, human_bytes: str) -> str | None:
        """``2 incomplete copies, 140.0 MiB, removed by prune after 2026-12-02 10:00 UTC``
        (``human_bytes``: the size as shown), or None when there are none."""
        if not self.copies or self.removed_after is None:
            return None
        s = "y" if self.copies == 1 else "ies"
        return (f"{self.copies} incomplete cop{s}, {human_bytes}, removed by prune after "
                f"{self.removed_after:%Y-%m-%d %H:%M} UTC")


def removed_after(backup_id: str) -> datetime:
    """When prune may remove an incomplete copy of ``backup_id`` (its id's time + a day)."""
    return id_time(backup_id) + LEFTOVER_AGE


def incomplete(backups: Sequence[Backup]) -> Incomplete:
    """Count and size the incomplete copies prune would remove in time: no manifest, and
    files we wrote (a folder of someone else's files is no copy: prune leaves it)."""
    found = [(b, c) for b in backups for c in b.copies
             if c.state == "incomplete" and c.owned_keys(b.id)]
    if not found:
        return Incomplete()
    return Incomplete(len(found), sum(o.size for _, c in found for o in c.objects),
                      max(removed_after(b.id) for b, _ in found))
