"""The restore journal: a crash in the middle of a swap is finished or undone by the next run.

A restore swaps two things in (uploads, then the database), each by renaming. Signals are held
during the swap, but SIGKILL, an OOM kill or a power cut can still land between the steps. So
``_swap`` records, before touching anything live, what it is about to do; the next run under the
lock (``recover``) looks at what is actually on disk and in the server, and either finishes the
restore (the database was swapped) or puts everything back as it was (it was not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from conexa_backup.actions import restore_db, restore_uploads
from conexa_backup.postgres import ConnInfo
from conexa_backup.state import RESTORE_JOURNAL as JOURNAL
from conexa_backup.state import restore_pending as pending
from conexa_backup.state import write_json

__all__ = ["JOURNAL", "begin", "end", "pending", "recover"]
log = logging.getLogger(__name__)


def begin(state_dir: Path, *, uploads: Path | None, staged: Path | None,
          kept_uploads: Path | None, live_db: str | None, restored_db: str | None,
          keep_db: str | None) -> None:
    """Record the swap about to happen (the restored tree is known by its inode)."""
    write_json(state_dir / JOURNAL, {
        "uploads": str(uploads) if uploads else None,
        "staged": str(staged) if staged else None,
        "staged_inode": staged.stat().st_ino if staged else None,
        "kept_uploads": str(kept_uploads) if kept_uploads else None,
        "live_db": live_db, "restored_db": restored_db, "keep_db": keep_db,
    })


def end(state_dir: Path) -> None:
    (state_dir / JOURNAL).unlink(missing_ok=True)


def _inode(path: str | None) -> int | None:
    try:
        return Path(path).stat().st_ino if path else None
    except OSError:
        return None


def _allow_connections(info: ConnInfo, *names: str | None) -> None:
    with info.connect(info.maintenance_db) as conn:
        for name in names:
            if name and restore_db.database_exists(info, name):
                try:
                    conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true")
                                 .format(sql.Identifier(name)))
                except psycopg.Error as exc:
                    log.error("could not reopen database %s: %s", name, exc)


def recover(state_dir: Path, info: ConnInfo) -> str | None:
    """Finish or undo a swap a crash interrupted; return what was done (None: nothing to do).

    The caller holds the run lock.
    """
    path = state_dir / JOURNAL
    if not path.exists():
        return None
    j: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    live, restored, keep_db = j.get("live_db"), j.get("restored_db"), j.get("keep_db")
    db_swapped = bool(keep_db) and restore_db.database_exists(info, str(keep_db)) and not (
        restored and restore_db.database_exists(info, str(restored)))
    finish = db_swapped or not live  # the database is restored, or was never part of it
    _allow_connections(info, live, keep_db)  # closed by versions that closed it to swap
    dest, staged, kept = j.get("uploads"), j.get("staged"), j.get("kept_uploads")
    if dest and staged and kept:
        uploads_swapped = _inode(dest) == j.get("staged_inode")
        old_at = kept if Path(kept).exists() else staged  # where the previous tree is now
        if uploads_swapped and not finish:
            restore_uploads.swap_in(Path(old_at), Path(dest), Path(kept + ".undone"))
            restore_uploads.remove_tree(Path(kept + ".undone"))  # the unused restored tree
        elif uploads_swapped and old_at == staged:
            Path(staged).rename(kept)  # the crash came between the exchange and this rename
        elif not uploads_swapped and Path(staged).exists():
            restore_uploads.remove_tree(Path(staged))  # never swapped in
    if not finish and restored:
        restore_db.drop_database(info, restored)
    path.unlink()
    outcome = "completed" if finish else "rolled back; the live system is as it was"
    log.warning("an interrupted restore was %s", outcome)
    return f"an interrupted restore was {outcome}"
