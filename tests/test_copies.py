"""Copies in three places: local + S3 (moto over HTTP) + GCS (fake-gcs-server over HTTP).

One backup is produced once and stored on every target; a copy is complete where its manifest
is; one target failing never stops the others; restores read the first good copy and fall back
when a copy is missing or corrupt.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from conexa_backup.testing.cluster import free_port
from conexa_backup.testing.compare import plain_dump, tree_snapshot
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET, Workspace

_prefixes = itertools.count()


def cloud_targets(s3_endpoint: str, *, s3_bucket: str = S3_BUCKET,
                  gcs_bucket: str = GCS_BUCKET, retries: int = 2) -> str:
    prefix = f"copies-{os.getpid()}-{next(_prefixes)}"
    return (f'[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "{s3_bucket}"\n'
            f'prefix = "{prefix}"\nendpoint_url = "{s3_endpoint}"\nretries = {retries}\n'
            f'[[targets]]\nname = "gcs"\ntype = "gcs"\nbucket = "{gcs_bucket}"\n'
            f'prefix = "{prefix}"\n')


@pytest.fixture
def ws3(ws: Workspace, s3_server: S3Server, gcs_server: GCSServer) -> Workspace:
    ws.write_config(cloud_targets(s3_server.endpoint))
    return ws


def _backup(ws: Workspace) -> dict[str, object]:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_three_copies_and_restore_from_the_cloud_when_local_is_damaged(ws3: Workspace) -> None:
    report = _backup(ws3)
    backup_id = str(report["id"])
    assert report["targets"] == ["local", "s3", "gcs"] and report["failed_targets"] == {}
    listing = json.loads(ws3.run("list", "--json").stdout)
    assert listing[0]["targets"] == ["local", "s3", "gcs"]

    # The local disk goes bad: one artifact corrupted, the other lost.
    _flip(ws3.backups / backup_id / "database.dump.zst")
    (ws3.backups / backup_id / "uploads.tar.zst").unlink()

    copy_db, copy_dir = f"{ws3.dbname}_copy", ws3.root / "from-cloud"
    result = ws3.run("restore", backup_id, "--to-database", copy_db,
                     "--uploads-to", str(copy_dir))
    assert result.returncode == 0, result.stderr
    assert plain_dump(ws3.cluster.env(), ws3.dbname) == plain_dump(ws3.cluster.env(), copy_db)
    assert tree_snapshot(copy_dir) == tree_snapshot(ws3.uploads)

    verify = ws3.run("verify", backup_id, "--json")
    assert verify.returncode == 1
    by_target = {c["target"]: c for c in json.loads(verify.stdout)["checks"]}
    assert not by_target["local"]["ok"] and by_target["s3"]["ok"] and by_target["gcs"]["ok"]
    assert ws3.run("verify", backup_id, "--target", "s3", "--target", "gcs").returncode == 0


def test_restore_from_a_named_target_and_no_fallback_beyond_it(ws3: Workspace) -> None:
    backup_id = str(_backup(ws3)["id"])
    _flip(ws3.backups / backup_id / "database.dump.zst")
    bad = ws3.run("restore", backup_id, "--only", "database", "--from", "local",
                  "--to-database", f"{ws3.dbname}_a")
    assert bad.returncode == 1 and "target 'local'" in bad.stderr
    assert "database.dump.zst" in bad.stderr and "damaged" in bad.stderr
    assert f"{ws3.dbname}_a" not in ws3.cluster.databases()
    good = ws3.run("restore", backup_id, "--only", "database", "--from", "gcs",
                   "--to-database", f"{ws3.dbname}_b")
    assert good.returncode == 0, good.stderr
    dl = ws3.run("download", backup_id, "--to", str(ws3.root / "dl"), "--target", "s3")
    assert dl.returncode == 0, dl.stderr
    assert (ws3.root / "dl" / backup_id / "manifest.json").is_file()


def test_one_target_down_gives_exit_3_and_complete_copies_elsewhere(
        ws: Workspace, gcs_server: GCSServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    ws.write_config(cloud_targets(dead, retries=1))
    result = ws.run("backup", "--json")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "partial" and report["targets"] == ["local", "gcs"]
    assert "s3" in report["failed_targets"]
    assert "s3" in result.stderr and "error:" in result.stderr
    backup_id = report["id"]
    # The copies that succeeded are complete and restore.
    ws.write_config()  # back to the local target alone: the endpoint is still dead
    restored = ws.run("restore", backup_id, "--only", "uploads",
                      "--uploads-to", str(ws.root / "r"), "--from", "local")
    assert restored.returncode == 0, restored.stderr
    assert tree_snapshot(ws.root / "r") == tree_snapshot(ws.uploads)


def test_every_target_down_is_a_failure_not_a_partial(ws: Workspace) -> None:
    blocker = ws.root / "blocker"
    blocker.write_text("x")
    ws.config.write_text(ws.config.read_text().replace(str(ws.backups), str(blocker / "b")))
    result = ws.run("backup")
    assert result.returncode == 1
    assert "every target failed" in result.stderr


def test_target_flag_limits_list_backup_and_delete(ws3: Workspace) -> None:
    only_s3 = ws3.run("backup", "--target", "s3", "--json")
    assert only_s3.returncode == 0, only_s3.stderr
    assert json.loads(only_s3.stdout)["targets"] == ["s3"]
    everywhere = str(_backup(ws3)["id"])
    assert [b["id"] for b in json.loads(ws3.run("list", "--json", "--target", "local").stdout)] \
        == [everywhere]
    deleted = ws3.run("delete", everywhere, "--yes", "--force", "--target", "gcs")
    assert deleted.returncode == 0, deleted.stderr
    entry = next(b for b in json.loads(ws3.run("list", "--json").stdout) if b["id"] == everywhere)
    assert entry["targets"] == ["local", "s3"]
    unknown = ws3.run("list", "--target", "nope")
    assert unknown.returncode == 2 and "nope" in unknown.stderr


def test_check_probes_every_target(ws3: Workspace, s3_server: S3Server) -> None:
    ok = ws3.run("check", "--json")
    assert ok.returncode == 0, ok.stdout
    ws3.write_config(cloud_targets(s3_server.endpoint, s3_bucket="missing-bucket"))
    bad = ws3.run("check", "--json")
    assert bad.returncode == 1
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert checks["target gcs"]["ok"] and not checks["target s3"]["ok"]
    assert "missing-bucket" in checks["target s3"]["detail"]


def test_seed_environment_variables_add_the_cloud_copies(
        ws: Workspace, s3_server: S3Server, gcs_server: GCSServer) -> None:
    env = {"AWS_S3_BUCKET": S3_BUCKET, "AWS_ENDPOINT_URL": s3_server.endpoint,
           "GCS_BUCKET": GCS_BUCKET}
    result = ws.run("backup", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["targets"] == ["local", "s3", "gcs"]
    ids = json.loads(ws.run("list", "--json", "--target", "s3", env=env).stdout)
    assert [b["id"] for b in ids] == [json.loads(result.stdout)["id"]]
    # Clean up: these objects sit at the bucket root, shared with other tests' prefixes.
    backup_id = json.loads(result.stdout)["id"]
    assert ws.run("delete", backup_id, "--yes", "--force", env=env).returncode == 0


def test_a_copy_that_cannot_be_read_is_not_marked_damaged_a_corrupt_one_is(
        ws3: Workspace, s3_server: S3Server) -> None:
    """One rule for "damaged" (catalog.proves_damage). Before: verify recorded damage for any
    problem, so an S3 read refused (here InvalidObjectState: a lifecycle rule moved the dump
    to Glacier; in the field a timeout or a 503) took a good copy out of retention's
    protection."""
    backup_id = str(_backup(ws3)["id"])
    prefix = next(line.split('"')[1] for line in ws3.config.read_text().splitlines()
                  if line.startswith("prefix = "))
    key = f"{prefix}/{backup_id}/database.dump.zst"
    s3_server.client().copy_object(Bucket=S3_BUCKET, Key=key, StorageClass="GLACIER",
                                   CopySource={"Bucket": S3_BUCKET, "Key": key},
                                   MetadataDirective="COPY")
    _flip(ws3.backups / backup_id / "database.dump.zst")

    verify = ws3.run("verify", "latest", "--json")
    assert verify.returncode == 1, verify.stdout + verify.stderr
    checks = {c["target"]: c for c in json.loads(verify.stdout)["checks"]}
    assert not checks["s3"]["ok"] and "InvalidObjectState" in str(checks["s3"]["problems"])
    assert not checks["local"]["ok"] and checks["gcs"]["ok"]

    entry = json.loads(ws3.run("list", "--json").stdout)[0]
    assert set(entry["damaged_targets"]) == {"local"}, entry  # the corrupt one only
    assert "SHA-256" in entry["damaged_targets"]["local"]["why"]
    assert entry["targets"] == ["s3", "gcs"]


def test_latest_from_a_target_and_a_drill_prefer_copies_not_known_damaged(
        ws3: Workspace) -> None:
    """The newest backup's local copy was found corrupt by a verify. ``restore latest --from
    local`` takes the newest backup with a good copy *there* (saying which it passed over);
    without ``--from`` it takes the newest one, from a good cloud copy; a drill of ``latest``
    drills a good copy, not the known-damaged first one. Before: ``--from local`` chose the
    newest backup and failed on its damaged copy, and the drill picked the local copy."""
    first = str(_backup(ws3)["id"])
    newest = str(_backup(ws3)["id"])
    _flip(ws3.backups / newest / "database.dump.zst")
    assert ws3.run("verify", newest, "--target", "local").returncode == 1

    local = ws3.run("restore", "latest", "--only", "database", "--from", "local",
                    "--to-database", f"{ws3.dbname}_a", "--json")
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["id"] == first
    assert (f"passed over backup {newest}: every copy on target 'local' is damaged"
            in local.stderr), local.stderr
    anywhere = ws3.run("restore", "latest", "--only", "database",
                       "--to-database", f"{ws3.dbname}_b", "--json")
    assert anywhere.returncode == 0, anywhere.stderr
    assert json.loads(anywhere.stdout)["id"] == newest

    drill = ws3.run("verify", "--drill", "latest", "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    results = json.loads(drill.stdout)["drills"]
    assert [(r["backup_id"], r["target"]) for r in results] == [(newest, "s3")]
