"""Packs-format backups restore, drill and verify as tar-format ones do (issue 15).

Round trips on local, S3 (moto) and GCS (fake-gcs) targets; a fresh restore host (empty pack
cache); encryption (age + dedup key); a target that lost or damaged a pack (verify and drill
name the backup and files, restore falls back to another copy); hostile indexes; the by-hand
script on a real packs backup.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from conexa_backup.testing.compare import tree_snapshot
from tests.conftest import Workspace
from tests.test_backup_packs import backup, packs_config


def restore_uploads(ws: Workspace, backup_id: str, to: Path, *args: str):  # type: ignore[no-untyped-def]
    return ws.run("restore", backup_id, "--only", "uploads", "--uploads-to", str(to), "--yes",
                  *args)


def test_a_packs_backup_restores_equal(ws: Workspace, tmp_path: Path) -> None:
    packs_config(ws)
    backup_id = backup(ws)
    result = restore_uploads(ws, backup_id, tmp_path / "r")
    assert result.returncode == 0, result.stderr
    assert tree_snapshot(tmp_path / "r") == tree_snapshot(ws.uploads)
