"""A throwaway PostgreSQL cluster for tests, the demo and benchmarks.

``initdb``/``pg_ctl`` refuse to run as root, so when we are root only those programs run as
the ``postgres`` user, through ``setpriv`` (which execs, so the pid we hold *is* postgres and a
stop signal reaches it). Clients stay root and connect over 127.0.0.1 with trust auth.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql


def find_bindir() -> Path:
    """The newest PostgreSQL server bin directory (``initdb``/``pg_ctl``)."""
    env = os.environ.get("CONEXA_PG_BINDIR")
    if env:
        return Path(env)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("no PostgreSQL server binaries found (initdb)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """A PostgreSQL cluster in a temporary folder; use as a context manager."""

    def __init__(self, base: Path | None = None) -> None:
        self.bindir = find_bindir()
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="conexa-pg-")) if base is None else base
        self.data = self.base / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self._as_root = os.geteuid() == 0

    # -- lifecycle ----------------------------------------------------------------------------
    def _server_cmd(self, program: str, *args: str) -> list[str]:
        argv = [str(self.bindir / program), *args]
        if self._as_root:
            return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]
        return argv

    def _prepare_base(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.base.chmod(0o755)
            # Every ancestor must be traversable by postgres (pytest's tmp dirs are 0700).
            for parent in self.base.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)

    def start(self) -> Cluster:
        self._prepare_base()
        subprocess.run(
            self._server_cmd("initdb", "-D", str(self.data), "-U", self.user, "-A", "trust",
                             "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"),
            check=True, capture_output=True,
        )
        opts = f"-p {self.port} -k {self.base} -h {self.host} -c fsync=off -c max_connections=50"
        subprocess.run(
            self._server_cmd("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"),
                             "-w", "-o", opts, "start"),
            check=True, capture_output=True,
        )
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._server_cmd("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                check=False, capture_output=True,
            )
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` (names are percent-encoded)."""
        from urllib.parse import quote

        return f"postgresql://{self.user}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def env(self) -> dict[str, str]:
        """libpq environment variables that reach this cluster."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user}

    @contextlib.contextmanager
    def connect(self, dbname: str = "postgres") -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=dbname, autocommit=True
        ) as conn:
            yield conn

    def execute(self, query: str | sql.Composed, dbname: str = "postgres") -> None:
        with self.connect(dbname) as conn:
            conn.execute(query)

    def create_database(self, name: str) -> None:
        self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self.execute(query.format(sql.Identifier(name)))

    def databases(self) -> set[str]:
        with self.connect() as conn:
            rows = conn.execute("SELECT datname FROM pg_database").fetchall()
        return {str(r[0]) for r in rows}

    def load_sql_file(self, path: Path, dbname: str = "postgres") -> None:
        """Run a SQL file through psql with errors fatal."""
        subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", str(path)],
            env={**os.environ, **self.env()}, check=True, capture_output=True,
        )
