"""Databases and folders a run creates beside the live ones, recorded so a kill leaves none.

An in-place restore loads ``<db>__restoring_<id>_p<pid>`` and extracts into
``.<uploads>.restoring-<id>.<pid>@<where>``; a drill loads ``conexa_drill_<id>_<token>``. A run
killed outright (SIGKILL, the OOM killer, a power cut) cannot remove them, and a database can
be as large as the live one. So before creating any, a run writes a *record* naming them in
``state_dir/leftovers/``, under a :func:`~conexa_backup.scratch.scratch_name` (its process, host,
boot and pid namespace); once they are gone (removed, or renamed into place by the swap) the
record goes too. Every locked run (:func:`sweep`) removes what the records of runs that are
gone name: their process no longer exists here (:func:`~conexa_backup.scratch.abandoned`), or the
record is older than a day (no run of ours lasts a day; a reboot changes the boot). A live run's
record is never touched, and only names of our own schemes (:func:`ours`) are ever removed,
whatever a record says.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from conexa_backup.errors import ConexaError, DatabaseError, first_line
from conexa_backup.postgres import ConnInfo
from conexa_backup.scratch import scratch_name, stale
from conexa_backup.state import private_dir, restore_pending, write_json

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context

log = logging.getLogger(__name__)
FOLDER = "leftovers"
# The names a record may make us remove: a restore's and a drill's own schemes, nothing else.
_DATABASE = re.compile(r"(?s).*__restoring_\d{8}T\d{6}Z\S*|conexa_drill_\d{8}T\d{6}Z\S*",
                       re.IGNORECASE)  # a drill's name is lower case
_FOLDER = re.compile(r"\..+\.restoring-\d{8}T\d{6}Z.*")

Servers = Callable[[str], ConnInfo]  # a record's server role ("db", "drill") -> where it is


def servers_of(ctx: Context) -> Servers:
    """A record's server role -> the configured server: ``drill`` is ``[drill].database_url``
    (or the database's server), anything else the database's."""
    return lambda role: ctx.drill_db if role == "drill" else ctx.db


def ours(database: str | None = None, folder: Path | None = None) -> bool:
    """Whether the name is one of the schemes this module may remove."""
    if database is not None:
        return _DATABASE.fullmatch(database) is not None
    return folder is not None and _FOLDER.fullmatch(folder.name) is not None


def claim(state_dir: Path, what: str, *, databases: Sequence[tuple[str, str]] = (),
          folders: Sequence[Path] = ()) -> Path:
    """Record, before they exist, the ``databases`` ((server role, name)) and ``folders``
    this process is about to create; return the record's path (for :func:`settle`).

    Raises:
        ValueError: a name outside our schemes (a bug: it could never be swept).
        OSError: the record cannot be written (nothing was created yet).
    """
    if not all(ours(database=name) for _, name in databases) or \
            not all(ours(folder=path) for path in folders):
        raise ValueError(f"not a scratch name of ours: {databases} {folders}")
    path = private_dir(state_dir / FOLDER) / scratch_name(f"{what}-{secrets.token_hex(3)}")
    write_json(path, {"what": what,
                      "databases": [{"server": role, "name": name} for role, name in databases],
                      "folders": [str(p.absolute()) for p in folders]})
    return path


def settle(record: Path, servers: Servers) -> tuple[bool, list[str]]:
    """Remove what ``record`` names that still exists, then the record. Returns whether all
    went (the record with it), and the names that existed and were removed.

    Run by the owner at its end (success or failure: a name swapped into place no longer
    exists and is left alone) and by :func:`sweep` for runs that are gone. Names outside our
    schemes are skipped, whatever the record says. What cannot be removed (a server down) is
    logged and the record kept, for the next locked run. Never raises but for an interrupt.
    """
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True, []
    except (OSError, ValueError) as exc:
        log.warning("unreadable leftovers record %s kept: %s", record, exc)
        return False, []
    done, removed = True, []
    for db in data.get("databases") or []:
        role, name = str(db.get("server")), str(db.get("name"))
        if ours(database=name):
            try:
                if _drop(servers(role), name):
                    removed.append(name)
            except ConexaError as exc:  # a server down, a drill URL now wrong: kept
                log.warning("could not drop leftover database %s: %s", name, exc)
                done = False
    for folder in map(Path, data.get("folders") or []):
        if ours(folder=folder) and (folder.exists() or folder.is_symlink()):
            try:
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
                removed.append(str(folder))
            except OSError as exc:
                log.warning("could not remove leftover folder %s: %s", folder, exc)
                done = False
    if done:
        record.unlink(missing_ok=True)
    return done, removed


def _drop(info: ConnInfo, name: str) -> bool:
    """Drop database ``name`` if it exists (``WITH (FORCE)``: a dead run's ``pg_restore`` may
    still be connected to it); whether it existed.

    Raises:
        DatabaseError: the server cannot be reached or refused the drop.
    """
    with info.connect(info.maintenance_db) as conn:
        try:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (name,)).fetchone()
            if found is not None:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot drop {name!r}: {first_line(exc)}") from None
    return found is not None


def pending(state_dir: Path, now: float | None = None) -> list[Path]:
    """The records of runs that are gone (see the module docstring), oldest name first."""
    root = state_dir / FOLDER
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    found = []
    for record in sorted(root.iterdir()):
        try:
            if stale(record, now):
                found.append(record)
        except OSError:  # removed meanwhile by its owner
            continue
    return found


def sweep(state_dir: Path, servers: Servers, now: float | None = None) -> list[str]:
    """Remove the databases and folders of runs that are gone; return what was removed.

    The caller holds the run lock and has settled the restore journal first
    (``journal.recover``): while a swap is pending, a restore's folder may hold the live
    tree, so nothing is swept then.
    """
    if restore_pending(state_dir):
        return []
    removed = []
    for record in pending(state_dir, now):
        removed += settle(record, servers)[1]
    return removed
