"""What every locked run does first, and all that ``conexa-backup recover`` does: settle what
killed runs left behind.

The scratch files in ``state_dir`` (``state.sweep_stale``: nothing live is ever there); then,
in this order, which matters: the restore journal (a swap interrupted half-way is finished or
undone; until then a restore's hidden folder may hold the live uploads), then the databases and
folders of restores and drills that are gone (:mod:`leftovers`). The caller holds the run lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conexa_backup.actions import journal, leftovers
from conexa_backup.actions.context import Context
from conexa_backup.state import sweep_stale


@dataclass
class Settled:
    """What was done: the journal's outcome (None: none was pending), the databases and
    folders removed, the scratch files removed."""

    journal: str | None = None
    removed: list[str] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per thing done, for people (empty: there was nothing to do)."""
        return ([self.journal] if self.journal else []) + \
            [f"removed {name}, left by a run that is gone" for name in self.removed] + \
            [f"removed stale scratch {path}" for path in self.scratch]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, "journal": self.journal, "removed": self.removed,
                "scratch": [str(p) for p in self.scratch]}


def settle(ctx: Context) -> Settled:
    """Finish or undo an interrupted restore's swap, then remove the leftovers of runs that
    are gone. The caller holds the run lock.

    Raises:
        DatabaseError: the journal names databases and the server cannot be reached (the
        leftovers are then not looked at: they wait for a run that can; stale scratch files
        are removed all the same).
        OSError: the journal's folders cannot be renamed.
    """
    state_dir = ctx.config.state_dir
    done = Settled(scratch=sweep_stale(state_dir))  # first: it needs no server
    done.journal = journal.recover(state_dir, ctx.db)
    done.removed = leftovers.sweep(state_dir, leftovers.servers_of(ctx))
    return done
