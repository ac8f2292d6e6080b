"""A restore checks what it needs before any work (README, "How a restore works"): an age
identity that fits an encrypted backup, the client tools, a role that may create (and swap)
databases, room to stage the copy. When something is missing it says what, exits 2, and has
done nothing: no safety backup on any target, the live system untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conexa_backup.crypto import fingerprint
from conexa_backup.testing.cluster import find_bindir
from conexa_backup.testing.compare import plain_dump, tree_snapshot
from tests.conftest import Workspace
from tests.test_failures import assert_error
from tests.test_trust import (
    backup_json,
    encryption_toml,
    hidden_siblings,
    make_age_key,
    staging_leftovers,
    toml_str,
)


def _offsite(ws: Workspace) -> str:
    """A second (local) target: a safety backup would go to both."""
    return (f'[[targets]]\nname = "offsite"\ntype = "local"\n'
            f'path = {toml_str(ws.root / "offsite")}\n')


def _snapshot(ws: Workspace) -> dict[str, Any]:
    targets = {name: sorted(p.name for p in folder.iterdir()) if folder.exists() else []
               for name, folder in (("local", ws.backups), ("offsite", ws.root / "offsite"))}
    return {"targets": targets, "databases": ws.cluster.databases(),
            "live": plain_dump(ws.cluster.env(), ws.dbname),
            "uploads": tree_snapshot(ws.uploads), "hidden": hidden_siblings(ws.uploads.parent)}


def _assert_untouched(ws: Workspace, before: dict[str, Any]) -> None:
    assert _snapshot(ws) == before  # no safety backup anywhere, nothing live changed
    assert staging_leftovers(ws) == []


def test_encrypted_restore_without_a_fitting_identity_does_nothing(ws: Workspace,
                                                                   tmp_path: Path) -> None:
    key = make_age_key(tmp_path / "keys" / "age-identity.txt")
    ws.write_config(_offsite(ws) + encryption_toml(key, identity=False))
    backup_id = backup_json(ws)["id"]
    before = _snapshot(ws)
    wanted = fingerprint(key.recipient)

    # No identity at all: each attempt used to add a full safety backup on every target.
    for _ in range(2):
        result = ws.run("restore", backup_id, "--yes")
        _assert_untouched(ws, before)
        assert_error(result, 2, "encrypted", wanted, "identity_file")

    # An identity that is not one of the recipients: both sets of fingerprints are named.
    other = make_age_key(tmp_path / "keys" / "someone else.txt")
    ws.write_config(_offsite(ws) + encryption_toml(key, identity=False)
                    + f"identity_file = {toml_str(other.file)}\n")
    message = assert_error(ws.run("restore", backup_id, "--yes", "--json"), 2,
                           "cannot decrypt", backup_id, wanted, fingerprint(other.recipient))
    assert other.identity not in message
    _assert_untouched(ws, before)
    # Uploads alone need the identity too.
    assert_error(ws.run("restore", backup_id, "--yes", "--only", "uploads"), 2, wanted)
    _assert_untouched(ws, before)


def test_missing_pg_restore_is_said_before_any_work(ws: Workspace) -> None:
    folder = ws.root / "bin"
    folder.mkdir()
    for tool in find_bindir().iterdir():
        if tool.name != "pg_restore":
            (folder / tool.name).symlink_to(tool)
    ws.write_config(_offsite(ws))
    backup_id = backup_json(ws)["id"]
    text = ws.config.read_text()
    ws.config.write_text(text.replace("[database]\n", f'[database]\nbin_dir = "{folder}"\n', 1))
    before = _snapshot(ws)
    assert_error(ws.run("restore", backup_id, "--yes"), 2, "pg_restore not found", str(folder))
    _assert_untouched(ws, before)


def test_a_role_without_createdb_is_refused_before_any_work(ws: Workspace) -> None:
    role = f"{ws.dbname}_nocreatedb"
    ws.cluster.execute(f'CREATE ROLE "{role}" LOGIN NOCREATEDB')
    try:
        ws.write_config(_offsite(ws))
        backup_id = backup_json(ws)["id"]
        me = f"://{ws.cluster.user}@"
        assert me in ws.config.read_text()
        ws.config.write_text(ws.config.read_text().replace(me, f"://{role}@"))
        before = _snapshot(ws)
        assert_error(ws.run("restore", backup_id, "--yes"), 2, f"role '{role}'", "CREATEDB")
        _assert_untouched(ws, before)
    finally:
        ws.cluster.execute(f'DROP ROLE "{role}"')


def test_too_little_room_to_stage_the_dump_is_refused_before_any_work(
        ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    from conexa_backup.actions import preflight  # new: its own import fails before
    ws.write_config(_offsite(ws))
    backup_id = backup_json(ws)["id"]
    before = _snapshot(ws)
    staging = ws.state / "staging"

    def usage(path: Any) -> Any:  # the staging file system is full, the others are not
        free = 1000 if Path(path) == staging else shutil.disk_usage(path).free
        return SimpleNamespace(free=free)

    monkeypatch.setattr(preflight.shutil, "disk_usage", usage)
    result: Any = ws.cli("restore", backup_id, "--yes")
    assert result.exit_code == 2, result.output
    assert "needs at least" in result.stderr and str(staging) in result.stderr
    _assert_untouched(ws, before)


def test_staging_need_is_a_lower_bound_of_the_dump() -> None:
    from conexa_backup.actions import preflight
    from conexa_backup.manifest import Artifact
    plain = Artifact(name="database.dump.zst", kind="database", size=10_000, sha256="0" * 64,
                     compression="zstd", content="pg_dump-custom")
    assert preflight.staging_need(plain) == 9_900
    encrypted = plain.model_copy(update={"name": "database.dump.zst.age", "encryption": "age"})
    assert preflight.staging_need(encrypted) == 19_800
