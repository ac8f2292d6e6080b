"""Restoring the database: into a fresh database, proven, then swapped in by renaming.

The live database is never written to. The dump is restored into a new database with
``pg_restore --exit-on-error -j N``; every table's row count is compared with the manifest's
(taken in the dump's own snapshot); only then, for an in-place restore, are the two databases
swapped by renaming inside one transaction. The old database is kept under a clear name.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import psycopg
from psycopg import sql

from conexa_backup import dumpoffsets, postgres, process, signals
from conexa_backup.actions.context import Context
from conexa_backup.actions.fetch import from_first_good, local_writes, read_plain
from conexa_backup.archive import extract_stream
from conexa_backup.catalog import Backup, Copy
from conexa_backup.errors import (
    DatabaseError,
    IntegrityError,
    ProcessError,
    UsageError,
    first_line,
)
from conexa_backup.manifest import DatabaseInfo, Manifest
from conexa_backup.pipeline import ThreadedSink, copy_stream
from conexa_backup.postgres import ConnInfo, ServerInfo
from conexa_backup.scratch import scratch_name

log = logging.getLogger(__name__)
MAX_NAME = 63  # PostgreSQL identifier limit, in bytes
SWAP_TIMEOUT = 30.0
WRITE_AHEAD_CHUNKS = 8  # of pipeline.CHUNK queued for the writer: about 10 MiB in all


def derived_name(base: str, suffix: str) -> str:
    """``base`` + ``suffix`` cut to PostgreSQL's 63-byte limit (cutting ``base``)."""
    room = MAX_NAME - len(suffix.encode())
    cut = base.encode()[:room].decode("utf-8", "ignore")
    return cut + suffix


def _execute(conn: psycopg.Connection[Any], query: sql.Composed, what: str) -> None:
    try:
        conn.execute(query)
    except psycopg.Error as exc:
        raise DatabaseError(f"{what}: {first_line(exc)}") from None


def database_exists(info: ConnInfo, name: str) -> bool:
    with info.connect(info.maintenance_db) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


class StagedDump:
    """A dump fetched into ``state_dir/staging``: a custom-format file (its data offsets
    filled in when they could be, see :mod:`conexa_backup.dumpoffsets`) or a directory-format
    folder. :meth:`unpatch` puts the file's own bytes back; :meth:`discard` removes it."""

    def __init__(self, path: Path, undo: Callable[[], None] | None = None) -> None:
        self.path = path
        self._undo = undo

    @property
    def patched(self) -> bool:
        return self._undo is not None

    def unpatch(self) -> bool:
        """Restore the file's bytes as stored; False when there was nothing to undo.

        Raises:
            OSError: the file could not be written.
        """
        if self._undo is None:
            return False
        self._undo()
        self._undo = None
        return True

    def discard(self) -> None:
        """Remove the fetched dump (file or folder); never raises."""
        discard(self.path)


class _Watched:
    """A sink that shows each chunk to an :class:`~conexa_backup.dumpoffsets.OffsetFinder`
    on its way to the file ``out``."""

    def __init__(self, out: BinaryIO, finder: dumpoffsets.OffsetFinder) -> None:
        self._out, self._finder = out, finder

    def write(self, data: bytes) -> int:
        self._finder.feed(data)
        return self._out.write(data)


def fetch_dump(ctx: Context, backup: Backup, source: str | None,
               fallbacks: list[str] | None = None,
               read_from: dict[str, str] | None = None) -> StagedDump:
    """Decompress the database artifact of the first good copy into ``state_dir/staging``;
    ``read_from`` gets the artifact's name -> the target it was read from.

    pg_restore needs a seekable file (or a folder) to restore in parallel; the checksum of the
    stored bytes is verified while they stream, and the result is discarded if it does not
    match. A custom-format file gets its data offsets filled in, so that pg_restore's workers
    seek to their tables' data instead of reading through the archive to find it.
    """
    staging = ctx.state_dir("staging") / scratch_name(
        f"{backup.id}-{secrets.token_hex(3)}-database.dump")

    def attempt(copy: Copy, manifest: Manifest) -> StagedDump:
        artifact = manifest.artifact("database")
        assert artifact is not None
        try:
            with local_writes(staging.parent):
                if artifact.content == "pg_dump-directory":
                    read_plain(copy, backup.id, artifact,
                               lambda plain: extract_stream(plain, staging), ctx.keys())
                    return StagedDump(staging)
                finder = dumpoffsets.OffsetFinder()
                with open(staging, "wb") as out:
                    staging.chmod(0o600)
                    # Written from a thread: decompressing and copying into the page
                    # cache overlap (measured on 2 cores: 1.5 -> 1.1 s for a 1.3 GB dump),
                    # and so does the search for the data blocks (0.05 s per 120 MiB).
                    with ThreadedSink(_Watched(out, finder), "write-dump",
                                      WRITE_AHEAD_CHUNKS) as writer:
                        read_plain(copy, backup.id, artifact,
                                   lambda plain: copy_stream(plain, writer), ctx.keys())
                return StagedDump(staging, _fill_offsets(staging, finder))
        except BaseException:
            discard(staging)
            raise

    def noted(copy: Copy, manifest: Manifest) -> StagedDump:
        dump = attempt(copy, manifest)
        artifact = manifest.artifact("database")
        if read_from is not None and artifact is not None:
            read_from[artifact.name] = copy.target.name
        return dump

    return from_first_good(backup, noted, prefer=source, fallbacks=fallbacks)


def _fill_offsets(staging: Path, finder: dumpoffsets.OffsetFinder) -> Callable[[], None] | None:
    """Fill the data offsets ``finder`` found into ``staging``; None when there are none."""
    offsets = finder.offsets()
    if offsets is None:
        log.info("dump restored as stored, without data offsets: %s",
                 finder.failed or "its blocks were not found in order")
        return None
    if not offsets:  # no table data: nothing to seek to
        return None
    try:
        return dumpoffsets.apply(staging, offsets, finder.off_size)
    except OSError as exc:
        log.warning("could not fill in the dump's data offsets: %s", exc)
        return None


def discard(dump: Path) -> None:
    """Remove a fetched dump (file or folder); never raises."""
    if dump.is_dir():
        shutil.rmtree(dump, ignore_errors=True)
    else:
        dump.unlink(missing_ok=True)


def _server_from(info: DatabaseInfo) -> ServerInfo:
    return ServerInfo(info.server_version, 0, info.encoding, info.collate, info.ctype,
                      info.owner, info.locale_provider, info.icu_locale)


def restore_into(info: ConnInfo, dump: StagedDump, db: DatabaseInfo, name: str) -> str:
    """Create database ``name`` like the source, restore ``dump`` into it, and prove its row
    counts; returns their summary. See :func:`restore_checked`.

    Raises:
        ProcessError: pg_restore reported an error. IntegrityError: row counts differ.
        DatabaseError: the database could not be created.
    """
    summary = restore_checked(info, dump, db, name, count=True)
    assert summary is not None
    return summary


def restore_checked(info: ConnInfo, dump: StagedDump, db: DatabaseInfo, name: str, *,
                    count: bool) -> str | None:
    """Create database ``name`` like the source and restore ``dump`` into it; with ``count``,
    or when the dump's data offsets were filled in, prove its row counts (the summary is
    returned; None when not counted).

    On any failure after the creation the new database is dropped. A creation that failed
    drops nothing: the name may belong to a database someone else made meanwhile. If
    pg_restore or the row counts fail on a dump whose offsets we filled in, the dump's own
    bytes are put back and the whole restore runs once more: a wrong offset never costs more
    than time.

    Raises:
        ProcessError: pg_restore reported an error. IntegrityError: row counts differ.
        DatabaseError: the database could not be created.
    """
    def attempt() -> str | None:
        create_database(info, db, name)
        try:
            restore(info, dump.path, name)
            return check_row_counts(info, name, db.tables) if count or dump.patched else None
        except BaseException:
            drop_database(info, name)
            raise

    try:
        return attempt()
    except (ProcessError, IntegrityError) as exc:
        if not dump.patched:
            raise
        log.warning("restore with the dump's data offsets filled in failed (%s); "
                    "restoring the dump as stored", first_line(exc))
        dump.unpatch()
        return attempt()


def create_database(info: ConnInfo, db: DatabaseInfo, name: str) -> None:
    """Create database ``name`` with the source's encoding, locale and owner.

    If anything fails once it exists, it is dropped again before the error propagates.

    Raises:
        DatabaseError: it could not be created (an owner that cannot be set is only logged).
    """
    with info.connect(info.maintenance_db) as conn:
        _execute(conn, postgres.create_database_sql(name, _server_from(db)),
                 f"cannot create database {name!r}")
        try:  # it is ours now: whatever fails before we return must not leave it behind
            _give_to(conn, name, db.owner)
        except BaseException:
            drop_database(info, name)
            raise


def _give_to(conn: psycopg.Connection[Any], name: str, owner: str) -> None:
    """Make ``owner`` own database ``name`` unless we are that role; a refusal is logged."""
    me = conn.execute("SELECT current_user").fetchone()
    if me is not None and me[0] != owner:
        try:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(name), sql.Identifier(owner)))
        except psycopg.Error as exc:
            log.warning("database %s: could not give it to owner %s: %s", name, owner,
                        first_line(exc))


def restore(info: ConnInfo, dump: Path, name: str) -> None:
    """``pg_restore --exit-on-error -j N`` of ``dump`` into the existing database ``name``.

    Raises:
        ProcessError: pg_restore reported an error.
    """
    process.run(postgres.pg_restore_argv(info, dump, name, info.jobs),
                env=info.env(name), what="pg_restore")


def check_row_counts(info: ConnInfo, name: str, expected: dict[str, int]) -> str:
    """Raise IntegrityError unless every table has exactly the manifest's row count.

    Returns a one-line summary ("12 tables, 176547 rows").
    """
    try:
        actual = _count_rows(info, name)
    except psycopg.Error as exc:
        raise DatabaseError(f"counting rows in {name!r}: {first_line(exc)}") from None
    problems = [f"{t}: {actual.get(t, 'missing')} rows, expected {n}"
                for t, n in sorted(expected.items()) if actual.get(t) != n]
    problems += [f"{t}: unexpected table" for t in sorted(set(actual) - set(expected))]
    fail_if(problems, f"restored database {name!r} differs from the backup")
    return f"{len(expected)} tables, {sum(expected.values())} rows"


def _count_rows(info: ConnInfo, name: str) -> dict[str, int]:
    """Every table's row count in database ``name``, on ``info.jobs`` connections at once:
    the tables dealt out largest first to the least loaded (a restore's last step, on the
    same cores pg_restore -j used; 0.57 s for a 1.3 GB database on one connection).

    Raises:
        psycopg.Error: a query failed. DatabaseError: a connection failed.
    """
    with info.connect(name) as conn:
        tables = postgres.tables_by_size(conn)
    groups: list[list[tuple[str, str]]] = [[] for _ in range(max(1, min(info.jobs,
                                                                        len(tables))))]
    load = [0] * len(groups)
    for schema, table, size in tables:
        least = load.index(min(load))
        groups[least].append((schema, table))
        load[least] += size + 1
    counted: list[dict[str, int]] = [{} for _ in groups]
    errors: list[BaseException] = []

    def count(i: int) -> None:
        try:
            with info.connect(name) as conn:
                counted[i] = postgres.count_rows(conn, groups[i])
        except Exception as exc:  # raised again by the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=count, args=(i,), name=f"count-rows-{i}", daemon=True)
               for i in range(1, len(groups))]
    for thread in threads:
        signals.start(thread)
    count(0)
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {k: v for part in counted for k, v in part.items()}


def fail_if(problems: list[str], what: str) -> None:
    """Raise IntegrityError listing the first few ``problems``, if there are any."""
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IntegrityError(f"{what}: " + "; ".join(problems[:5]) + more)


def drop_database(info: ConnInfo, name: str) -> None:
    """Drop a database we created (never raises: it is cleanup)."""
    try:
        with info.connect(info.maintenance_db) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
    except (psycopg.Error, DatabaseError) as exc:
        log.error("could not drop database %s: %s", name, exc)


def swap_in(info: ConnInfo, live: str, restored: str, keep_as: str) -> str | None:
    """Make ``restored`` the live database; keep the old one as ``keep_as``.

    Returns the name the old database is kept under (None if there was no live database).

    Raises:
        DatabaseError: the swap was refused; the live database is then unchanged.
    """
    with info.connect(info.maintenance_db) as conn:
        rename = sql.SQL("ALTER DATABASE {} RENAME TO {}")
        if not database_exists(info, live):
            _execute(conn, rename.format(sql.Identifier(restored), sql.Identifier(live)),
                     f"cannot rename {restored!r} to {live!r}")
            return None
        if database_exists(info, keep_as):
            raise UsageError(f"database {keep_as!r} already exists; cannot keep the old one")
        # No persistent "closed" flag (ALLOW_CONNECTIONS false) that a crash could leave set:
        # end the sessions and rename at once, again while the application reconnects.
        deadline = time.monotonic() + SWAP_TIMEOUT
        while True:
            _disconnect_all(conn, live)
            try:
                with conn.transaction():
                    conn.execute(rename.format(sql.Identifier(live), sql.Identifier(keep_as)))
                    conn.execute(rename.format(sql.Identifier(restored), sql.Identifier(live)))
                return keep_as
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise DatabaseError(f"{live!r} kept getting new sessions for "
                                        f"{SWAP_TIMEOUT:.0f} s; stop the application and "
                                        "retry") from None
                time.sleep(0.05)
            except psycopg.Error as exc:
                raise DatabaseError(f"cannot swap in the restored database: "
                                    f"{first_line(exc)}") from None


def _disconnect_all(conn: psycopg.Connection[Any], name: str, timeout: float = 30) -> None:
    """Terminate every other session on database ``name`` and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()", (name,)).fetchone()
        except psycopg.Error as exc:
            raise DatabaseError(
                f"cannot end the sessions on {name!r}: {first_line(exc)}",
                hint="the restoring role needs to be superuser or a member of "
                     "pg_signal_backend") from None
        if not row or row[0] == 0:
            return
        if time.monotonic() > deadline:
            raise DatabaseError(f"sessions on {name!r} did not end within {timeout:.0f} s")
        time.sleep(0.1)
