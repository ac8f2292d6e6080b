"""PostgreSQL: connection settings, argv builders for the client tools, snapshots, row counts.

Connection settings travel to ``pg_dump``/``pg_restore``/``psql`` as libpq environment
variables (``PGHOST``, ``PGPASSWORD``...), never in argv; argv only ever names the database.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conexa_backup import process
from conexa_backup.config import DatabaseConfig
from conexa_backup.errors import ConfigError, DatabaseError, first_line

# libpq connection parameters and the environment variables that carry them.
_ENV_OF = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
    "user": "PGUSER", "password": "PGPASSWORD", "passfile": "PGPASSFILE",
    "service": "PGSERVICE", "options": "PGOPTIONS", "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE", "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT", "sslcrl": "PGSSLCRL", "sslpassword": "PGSSLPASSWORD",
    "requiressl": "PGREQUIRESSL", "gssencmode": "PGGSSENCMODE",
    "connect_timeout": "PGCONNECT_TIMEOUT", "target_session_attrs": "PGTARGETSESSIONATTRS",
    "channel_binding": "PGCHANNELBINDING", "krbsrvname": "PGKRBSRVNAME",
}
_SECRET_KEYS = {"password", "sslpassword"}

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnInfo:
    """Where the database is and how to log in. ``params`` may hold a password."""

    params: dict[str, str]
    maintenance_db: str = "postgres"
    bin_dir: Path | None = None
    jobs: int = 2

    @property
    def dbname(self) -> str:
        return self.params["dbname"]

    def env(self, dbname: str | None = None) -> dict[str, str]:
        """libpq environment for a child process, pointed at ``dbname`` (default: ours)."""
        env = {_ENV_OF[k]: v for k, v in self.params.items()}
        env["PGDATABASE"] = dbname or self.dbname
        return env

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection (autocommit unless told otherwise).

        Raises:
            DatabaseError: the server is unreachable or refused us (message without secrets).
        """
        params: dict[str, Any] = {**self.params, "dbname": dbname or self.dbname}
        params.setdefault("autocommit", True)
        params.update(kwargs)
        try:
            return psycopg.connect(**params)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {self.describe(dbname)}: {first_line(exc)}") \
                from None

    def describe(self, dbname: str | None = None) -> str:
        """``user@host:port/db`` for messages; never the password."""
        host = self.params.get("host", "localhost")
        port = self.params.get("port", "5432")
        user = self.params.get("user", "")
        at = f"{user}@" if user else ""
        return f"database {dbname or self.dbname!r} at {at}{host}:{port}"

    def tool(self, name: str) -> str:
        """Path of a client tool (``pg_dump``...), from ``bin_dir`` when configured."""
        if self.bin_dir is not None:
            return str(self.bin_dir / name)
        return shutil.which(name) or name


def conninfo(config: DatabaseConfig) -> ConnInfo:
    """Parse ``[database]`` into a :class:`ConnInfo`, reading ``password_file`` if set.

    Raises:
        ConfigError: the URL cannot be parsed, names no database, or uses an unknown parameter.
    """
    params = parse_url(config.url, config.password_file, "database")
    return ConnInfo(params, config.maintenance_database, config.bin_dir, config.jobs)


def parse_url(url: str, password_file: Path | None, section: str,
              need_dbname: bool = True) -> dict[str, str]:
    """libpq parameters of ``url`` (plus the password from ``password_file``).

    Raises:
        ConfigError: naming ``section``, when the URL is unusable.
    """
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items()}
    except psycopg.ProgrammingError:
        raise ConfigError(f"{section}.url: not a valid PostgreSQL URL") from None
    unknown = sorted(set(params) - set(_ENV_OF))
    if unknown:
        raise ConfigError(f"{section}.url: unsupported parameter(s): {', '.join(unknown)}")
    if need_dbname and not params.get("dbname"):
        raise ConfigError(f"{section}.url: the URL must name a database (…/dbname)")
    if password_file is not None:
        try:
            params["password"] = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"{section}.password_file: cannot read {password_file}: {exc.strerror}"
            ) from None
    return params


def redact(text: str, info: ConnInfo) -> str:
    """Remove every secret of ``info`` from ``text`` (for error messages from libpq/tools)."""
    for key in _SECRET_KEYS:
        secret = info.params.get(key)
        if secret:
            text = text.replace(secret, "********")
    return text


# -- versions ---------------------------------------------------------------------------------

def tool_version(info: ConnInfo, tool: str = "pg_dump") -> tuple[str, int]:
    """(full version string, major) of a client tool, e.g. ("15.18", 15)."""
    out = process.run([info.tool(tool), "--version"], what=tool)
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        raise DatabaseError(f"cannot parse {tool} --version output: {out.strip()!r}")
    return match.group(0), int(match.group(1))


@dataclass(frozen=True)
class ServerInfo:
    version: str
    version_num: int
    encoding: str
    collate: str
    ctype: str
    owner: str
    locale_provider: str = "c"
    icu_locale: str | None = None

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_info(conn: psycopg.Connection[Any]) -> ServerInfo:
    """Version and the current database's encoding, locale and owner."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,"
        " pg_get_userbyid(d.datdba)"
        " FROM pg_database d WHERE d.datname = current_database()"
    ).fetchone()
    assert row is not None
    provider, icu = "c", None
    if int(row[1]) >= 150000:
        prow = conn.execute(
            "SELECT datlocprovider::text, daticulocale FROM pg_database"
            " WHERE datname = current_database()"
        ).fetchone()
        if prow is not None:
            provider, icu = str(prow[0]), prow[1]
    return ServerInfo(str(row[0]).split()[0], int(row[1]), str(row[2]), str(row[3]),
                      str(row[4]), str(row[5]), provider, icu)


# -- snapshot and row counts ------------------------------------------------------------------

_USER_TABLES = """
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
"""
_TABLES = "SELECT n.nspname, c.relname" + _USER_TABLES + "ORDER BY 1, 2"
_TABLES_BY_SIZE = ("SELECT n.nspname, c.relname, pg_relation_size(c.oid)" + _USER_TABLES
                   + "ORDER BY 3 DESC, 1, 2")


def tables_by_size(conn: psycopg.Connection[Any]) -> list[tuple[str, str, int]]:
    """(schema, table, bytes) of every user table (the tables :func:`row_counts` counts),
    largest first."""
    rows = conn.execute(_TABLES_BY_SIZE).fetchall()
    return [(str(a), str(b), int(n)) for a, b, n in rows]


def count_rows(conn: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> dict[str, int]:
    """Exact row count of each of ``tables``, keyed ``schema.table``."""
    counts: dict[str, int] = {}
    for schema, table in tables:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        row = conn.execute(query).fetchone()
        assert row is not None
        counts[f"{schema}.{table}"] = int(row[0])
    return counts


class TableLockTimeout(Exception):
    """A statement gave up waiting for a lock on ``table`` (a quoted, qualified name)."""

    def __init__(self, table: str) -> None:
        super().__init__(table)
        self.table = table


class Stopped(Exception):
    """Counting was asked to stop (see :func:`row_counts`)."""


def row_counts(conn: psycopg.Connection[Any], lock_wait: timedelta | None = None,
               stop: threading.Event | None = None) -> dict[str, int]:
    """Exact row count of every user table, keyed ``schema.table`` (names unquoted).

    ``conn`` is in a transaction; with ``lock_wait``, a table whose lock takes longer than
    that raises :class:`TableLockTimeout` (else the count waits behind, say, a migration's
    ACCESS EXCLUSIVE lock for as long as it is held).

    Raises:
        TableLockTimeout: see above.
        Stopped: ``stop`` was set (checked before each query: a cancel sent from another
            thread between two queries would otherwise cancel nothing).
    """
    if lock_wait is not None:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{_ms(lock_wait)}ms",))
    counts: dict[str, int] = {}
    for schema, table in conn.execute(_TABLES).fetchall():
        if stop is not None and stop.is_set():
            raise Stopped("row counts stopped")
        name = sql.Identifier(schema, table)
        try:
            # In a savepoint: an error must not end the transaction, whose exported snapshot
            # pg_dump (and its -j workers) may still have to import.
            with conn.transaction():
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(name)).fetchone()
        except psycopg.errors.LockNotAvailable:
            raise TableLockTimeout(name.as_string(conn)) from None
        assert row is not None
        counts[f"{schema}.{table}"] = int(row[0])
    return counts


_OBJECTS = {
    "tables": """
        SELECT n.nspname || '.' || c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' AND {user_ns} AND {not_ext}""",
    "sequences": """
        SELECT n.nspname || '.' || c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'S' AND c.relpersistence <> 't' AND {user_ns} AND {not_ext}""",
    "views": """
        SELECT n.nspname || '.' || c.relname FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND {user_ns} AND {not_ext}""",
    "functions": """
        SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
               || ')'
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE {user_ns} AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid =
              'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')""",
    "extensions": "SELECT extname FROM pg_extension",
}
_USER_NS = ("n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname !~ '^pg_(toast|temp_)'")
_NOT_EXT = ("NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
            " AND d.objid = c.oid AND d.deptype = 'e')")


def schema_objects(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Names of the user's tables, sequences, views, functions and extensions, sorted.

    Recorded in the manifest so that a restore drill can prove every object came back.
    """
    found = {}
    for kind, query in _OBJECTS.items():
        text = query.format(user_ns=_USER_NS, not_ext=_NOT_EXT)
        found[kind] = sorted(str(r[0]) for r in conn.execute(text).fetchall())
    return found


@dataclass
class Snapshot:
    """An open REPEATABLE READ transaction whose snapshot ``pg_dump --snapshot`` can share."""

    id: str
    conn: psycopg.Connection[Any]
    server: ServerInfo


@contextlib.contextmanager
def exported_snapshot(info: ConnInfo) -> Iterator[Snapshot]:
    """Open a read-only repeatable-read transaction and export its snapshot.

    The transaction stays open (so the snapshot stays importable) until the block ends.

    Raises:
        DatabaseError: cannot connect or export.
    """
    conn = info.connect(autocommit=False)
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        try:
            server = server_info(conn)
            row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        except psycopg.Error as exc:
            raise DatabaseError(f"{info.describe()}: {first_line(exc)}") from None
        assert row is not None
        yield Snapshot(str(row[0]), conn, server)
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        conn.close()


# -- argv builders ----------------------------------------------------------------------------

def pg_dump_argv(info: ConnInfo, snapshot_id: str | None,
                 lock_wait: timedelta | None = None) -> list[str]:
    """A custom-format, uncompressed dump to stdout (we compress it ourselves, faster).
    With ``lock_wait``, pg_dump fails instead of waiting longer for a table lock."""
    argv = [info.tool("pg_dump"), "--format=custom", "--compress=0", "--no-password"]
    return argv + _dump_options(snapshot_id, lock_wait)


def pg_dump_directory_argv(info: ConnInfo, snapshot_id: str | None, jobs: int,
                           folder: Path, lock_wait: timedelta | None = None) -> list[str]:
    """A directory-format dump by ``jobs`` workers into ``folder`` (uncompressed: we compress
    the files ourselves). ``--verbose`` reports each finished table ("finished item N"), which
    lets the caller archive that table's file while the workers go on. ``lock_wait``: as
    :func:`pg_dump_argv` (the leader takes every table's lock before the workers start)."""
    argv = [info.tool("pg_dump"), "--format=directory", "--compress=0", "--no-password",
            "--verbose", f"--jobs={jobs}", f"--file={folder}"]
    return argv + _dump_options(snapshot_id, lock_wait)


def _dump_options(snapshot_id: str | None, lock_wait: timedelta | None) -> list[str]:
    options = [f"--snapshot={snapshot_id}"] if snapshot_id else []
    if lock_wait is not None:  # in milliseconds: pg_dump passes it to SET statement_timeout
        options.append(f"--lock-wait-timeout={_ms(lock_wait)}")
    return options


def _ms(delta: timedelta) -> int:
    return int(delta.total_seconds() * 1000)


# pg_dump gave up waiting for the ACCESS SHARE lock it takes on every table it dumps.
_LOCK_TIMEOUT = re.compile(r"canceling statement due to statement timeout\s*\n"
                           r"(?:.*\n)*?.*Query was: LOCK TABLE (.+) IN ACCESS SHARE MODE")

_LOCK_HOLDERS = """
SELECT a.pid, a.usename, a.query_start, a.query, l.granted, pg_blocking_pids(a.pid)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation = to_regclass(%s) AND a.pid <> pg_backend_pid()
ORDER BY l.granted DESC, a.query_start
"""


def lock_timeout_error(info: ConnInfo, stderr_tail: str, waited: str) -> DatabaseError | None:
    """When ``stderr_tail`` (pg_dump's) says it gave up waiting for a table lock: an error
    naming the table and the sessions holding (or queued for) an ACCESS EXCLUSIVE lock on it,
    looked up now in pg_locks and pg_stat_activity. None for any other failure."""
    found = _LOCK_TIMEOUT.search(stderr_tail)
    return None if found is None else lock_wait_error(info, found[1], waited, "pg_dump")


def lock_wait_error(info: ConnInfo, table: str, waited: str, who_waited: str) -> DatabaseError:
    """``who_waited`` gave up after ``waited`` on a lock on ``table`` (a name ``to_regclass``
    reads): an error naming the sessions that hold, or are queued for, an ACCESS EXCLUSIVE
    lock on it, looked up now in pg_locks and pg_stat_activity."""
    try:
        with info.connect() as conn:
            rows = conn.execute(_LOCK_HOLDERS, (table,)).fetchall()
        who = "; ".join(_describe_holder(*row) for row in rows) or \
            "a session that has ended since"
    except (DatabaseError, psycopg.Error) as exc:
        who = f"a session that could not be looked up ({first_line(exc)})"
    error = DatabaseError(f"{who_waited} waited {waited} (database.lock_wait_timeout) for a "
                          f"lock on table {table} and gave up; the lock is held by {who}")
    # Logged now, as found: the run may end much later (pg_dump finishing its work), and by
    # then the blocking session may be gone.
    _log.warning("%s", error)
    return error


def _describe_holder(pid: int, user: str | None, started: datetime | None, query: str | None,
                     granted: bool, blockers: list[int]) -> str:
    """``pid 123 (user alice, query started 2026-12-05 16:00:01 UTC): ALTER TABLE ...``."""
    when = started.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if started else "unknown"
    waiting = "" if granted else ", queued for it" + (
        " behind pid " + ", ".join(map(str, blockers)) if blockers else "")
    line = (query or "").strip().splitlines()[0][:200] if (query or "").strip() else "-"
    return f"pid {pid} (user {user or 'unknown'}, query started {when}{waiting}): {line}"


def pg_dumpall_globals_argv(info: ConnInfo, superuser: bool) -> list[str]:
    """Roles and tablespaces; role passwords only when we may read them (superuser)."""
    argv = [info.tool("pg_dumpall"), "--globals-only", "--no-password",
            f"--database={info.maintenance_db}"]
    if not superuser:
        argv.append("--no-role-passwords")
    return argv


def pg_restore_argv(info: ConnInfo, archive: Path, dbname: str, jobs: int) -> list[str]:
    """Restore ``archive`` into the existing ``dbname``; any error is fatal."""
    # A bare name containing "=" would be read as a connection string: always pass one.
    return [info.tool("pg_restore"), "--exit-on-error", "--no-password", f"--jobs={jobs}",
            f"--dbname={make_conninfo(dbname=dbname)}", str(archive)]


def create_database_sql(name: str, server: ServerInfo | None) -> sql.Composed:
    """CREATE DATABASE with the source database's encoding and locale."""
    parts: list[sql.Composable] = [
        sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    ]
    if server is not None:
        parts.append(sql.SQL(" ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(server.encoding), sql.Literal(server.collate), sql.Literal(server.ctype)))
        if server.locale_provider == "i" and server.icu_locale:
            parts.append(sql.SQL(" LOCALE_PROVIDER icu ICU_LOCALE {}").format(
                sql.Literal(server.icu_locale)))
    return sql.Composed(parts)

