"""Equality helpers for round-trip tests: what was backed up must be what comes back.

- :func:`tree_snapshot` describes a directory tree (kinds, modes, sizes, contents, mtimes);
- :func:`plain_dump` is a database's plain-SQL ``pg_dump``, stable between runs;
- :func:`table_row_counts` is the exact row count of every table.

Compare two snapshots (or dumps, or counts) with ``==``; pytest shows the differences.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

__all__ = ["plain_dump", "table_row_counts", "tree_snapshot"]

#: ``(kind, mode & 0o7777, size | None, sha256 | link target | None, mtime seconds)``
Entry = tuple[str, int, int | None, str | None, int]

_CHUNK = 1024 * 1024


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_snapshot(root: Path) -> dict[str, Entry]:
    """Describe every entry below ``root`` (not ``root`` itself), never following symlinks.

    Keys are POSIX relative paths, in sorted walk order. Values are
    ``(kind, mode, size, content, mtime)``:

    - files: ``("file", mode, size, sha256 hex, mtime)``;
    - directories: ``("dir", mode, None, None, mtime)``;
    - symlinks: ``("symlink", mode, None, link target, 0)`` (their mtimes are not comparable:
      few tools restore them).

    ``mode`` is ``st_mode & 0o7777``; ``mtime`` is whole seconds (truncated).

    Raises:
        ValueError: an entry is neither a regular file, a directory nor a symlink
            (a FIFO, socket or device).
    """
    result: dict[str, Entry] = {}

    def walk(directory: str, prefix: str) -> None:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            mtime = st.st_mtime_ns // 1_000_000_000
            if stat.S_ISLNK(st.st_mode):
                # Not Path.readlink(): it would normalise the target ("./a//b" -> "a/b").
                target = os.readlink(entry.path)  # noqa: PTH115
                result[rel] = ("symlink", mode, None, target, 0)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", mode, None, None, mtime)
                walk(entry.path, rel + "/")
            elif stat.S_ISREG(st.st_mode):
                result[rel] = ("file", mode, st.st_size, _sha256(entry.path), mtime)
            else:
                raise ValueError(f"unsupported file type at {rel!r}: mode {st.st_mode:#o}")

    walk(os.fspath(root), "")
    return result


def plain_dump(conninfo_env: Mapping[str, str], dbname: str) -> str:
    """The plain-SQL ``pg_dump`` (default options) of database ``dbname``, made reproducible.

    ``conninfo_env`` holds libpq environment variables (``PGHOST``, ``PGPORT``, ``PGUSER``,
    ``PGPASSWORD``...) added to the child's environment; the database is named with ``-d``.
    The ``\\restrict`` / ``\\unrestrict`` lines are dropped: pg_dump >= 15.14 puts a random key
    there, which would make two dumps of the same data differ.

    Raises:
        RuntimeError: pg_dump exited non-zero (the message includes its stderr).
    """
    env = {**os.environ, **conninfo_env}
    proc = subprocess.run(
        ["pg_dump", "-d", make_conninfo(dbname=dbname)],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace").strip()
        raise RuntimeError(f"pg_dump of {dbname!r} failed (exit {proc.returncode}): {stderr}")
    text = proc.stdout.decode("utf-8")
    return "".join(
        line
        for line in text.splitlines(keepends=True)
        if not line.startswith(("\\restrict ", "\\unrestrict "))
    )


_TABLES_QUERY = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class AS c
JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%'
  AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY n.nspname, c.relname
"""


def table_row_counts(conninfo: str) -> dict[str, int]:
    """``"schema.table"`` -> exact ``count(*)`` for every ordinary table of the database.

    Covers relkind ``'r'``, which includes partitions; partitioned parents (relkind ``'p'``)
    hold no rows of their own and are skipped so rows are not counted twice. System schemas,
    TOAST and temporary schemas are excluded. Names are unquoted in the keys.
    """
    counts: dict[str, int] = {}
    with psycopg.connect(conninfo, autocommit=True) as conn:
        tables = conn.execute(_TABLES_QUERY).fetchall()
        for schema, table in tables:
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            row = conn.execute(query).fetchone()
            counts[f"{schema}.{table}"] = int(row[0]) if row is not None else 0
    return counts
