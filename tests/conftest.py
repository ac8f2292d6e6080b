"""Shared fixtures: one real PostgreSQL cluster for the session, a workspace per test."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conexa_backup.cli import app
from conexa_backup.testing.cluster import Cluster
from conexa_backup.testing.emulators import GCSServer, S3Server
from conexa_backup.testing.sample import load_conexa, make_uploads_tree

TEMPLATE_DB = "conexa_template"
_names = itertools.count()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        c.create_database(TEMPLATE_DB)
        load_conexa(c.url(TEMPLATE_DB), scale=0.02)
        yield c


def fresh_db(cluster: Cluster, template: str = TEMPLATE_DB, prefix: str = "conexa") -> str:
    name = f"{prefix}_{os.getpid()}_{next(_names)}"
    cluster.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


@dataclass
class Workspace:
    """A test's world: a database, an uploads folder, a local target and a config file."""

    root: Path
    cluster: Cluster
    dbname: str
    uploads: Path
    backups: Path
    state: Path
    config: Path

    def write_config(self, extra: str = "", *, database: str | None = None,
                     uploads: bool = True, compression: str = "zstd") -> Path:
        url = self.cluster.url(database or self.dbname)
        text = (
            f'state_dir = "{self.state}"\n'
            f'[database]\nurl = "{url}"\n'
            # Pinned to tar: most tests look at a tar backup's files; packs backups (the
            # default) have their own tests (tests/test_*packs*.py, test_gc*.py).
            + (f'[uploads]\npath = "{self.uploads}"\nformat = "tar"\n' if uploads else "")
            + f'[compression]\nalgorithm = "{compression}"\n'
            + f'[[targets]]\nname = "local"\ntype = "local"\npath = "{self.backups}"\n'
            + extra
        )
        self.config.write_text(text, encoding="utf-8")
        return self.config

    def cli(self, *args: str) -> object:
        """Run the CLI in-process (Typer's runner); returns click's Result."""
        runner = CliRunner()
        return runner.invoke(app, ["--config", str(self.config), *args], catch_exceptions=False)

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the CLI as a real subprocess (``python -m conexa_backup``)."""
        return subprocess.run(
            [sys.executable, "-m", "conexa_backup", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL, check=False,
        )


def module_workspace(root: Path, cluster: Cluster) -> Workspace:
    """A workspace in ``root`` shared by a module's tests (a database of its own, 20 upload
    files, a local target); the caller drops ``dbname`` at the end."""
    dbname = fresh_db(cluster)
    make_uploads_tree(root / "srv" / "uploads", files=20, seed=7)
    ws = Workspace(root, cluster, dbname, root / "srv" / "uploads", root / "backups",
                   root / "state", root / "backup.toml")
    ws.write_config()
    return ws


@pytest.fixture
def ws(tmp_path: Path, cluster: Cluster) -> Iterator[Workspace]:
    dbname = fresh_db(cluster)
    uploads = tmp_path / "srv" / "uploads"
    make_uploads_tree(uploads, files=60, seed=7)
    space = Workspace(tmp_path, cluster, dbname, uploads, tmp_path / "backups",
                      tmp_path / "state", tmp_path / "backup.toml")
    space.write_config()
    yield space
    for name in cluster.databases():
        if name.startswith(dbname):
            cluster.drop_database(name)


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up a developer's real config or database URL."""
    for var in ("CONEXA_BACKUP_CONFIG", "DATABASE_URL", "PGPASSWORD", "PGDATABASE"):
        monkeypatch.delenv(var, raising=False)


S3_BUCKET = "conexa-test"
GCS_BUCKET = "conexa-test-gcs"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 API over HTTP on 127.0.0.1, with bucket ``S3_BUCKET``."""
    with S3Server() as server:
        server.create_bucket(S3_BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server on 127.0.0.1 (sets STORAGE_EMULATOR_HOST), with bucket ``GCS_BUCKET``."""
    with GCSServer() as server:
        server.create_bucket(GCS_BUCKET)
        yield server


@pytest.fixture
def api(ws: Workspace) -> Iterator[Any]:
    """``conexa-backup serve`` over ``ws`` (local target, real PostgreSQL), HS256 auth with
    roles ``admin`` (admin and restore) and ``viewer`` (read): see tests/apikit.py."""
    from tests.apikit import running, start_api

    with running(start_api(ws)) as server:
        yield server
