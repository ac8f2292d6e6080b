"""Every restore and download says which target it read each artifact from (issue 19): the
restore in its text output and ``--json`` (``read_from``), ``download`` on stderr (its stdout
stays the folder alone); the HTTP download in ``X-Conexa-Target`` (test_server_download).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Workspace
from tests.test_failures import assert_ok

SECOND = "second"


def _two_targets(ws: Workspace) -> Path:
    second = ws.root / SECOND
    ws.write_config(f'[[targets]]\nname = "{SECOND}"\ntype = "local"\npath = "{second}"\n')
    return second


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_restore_and_download_say_where_each_artifact_came_from(ws: Workspace,
                                                                tmp_path: Path) -> None:
    _two_targets(ws)
    backup_id = json.loads(assert_ok(ws.run("backup", "--json")))["id"]
    _corrupt(ws.backups / backup_id / "database.dump.zst")  # the first copy's dump is bad

    result = ws.run("restore", backup_id, "--to-database", f"{ws.dbname}_from",
                    "--uploads-to", str(tmp_path / "a"), "--yes", "--json")
    report = json.loads(assert_ok(result))
    # The dump from the second target (the first one's is damaged), the uploads from the first.
    assert report["read_from"] == {"database.dump.zst": SECOND, "uploads.tar.zst": "local"}

    human = assert_ok(ws.run("restore", backup_id, "--to-database", f"{ws.dbname}_from2",
                             "--uploads-to", str(tmp_path / "b"), "--yes"))
    # The local copy is known damaged now: known-damaged copies are read last, for all.
    assert "database.dump.zst from target 'second'" in human, human
    assert "uploads.tar.zst from target 'second'" in human, human

    fetched = ws.run("download", backup_id, "--to", str(tmp_path / "dl"))
    assert assert_ok(fetched).strip() == str(tmp_path / "dl" / backup_id)  # stdout unchanged
    for name in ("database.dump.zst", "uploads.tar.zst", "manifest.json"):
        assert f"{name} from target 'second'" in fetched.stderr, fetched.stderr
