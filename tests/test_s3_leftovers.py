"""What S3 keeps after a delete, and what a killed upload leaves (issue 19), on moto:

- a pruned copy under Object Lock is only hidden behind delete markers: prune says
  ``hidden (locked until …)``, not ``deleted``, and removes the hidden versions of our keys
  once their lock has passed (nothing else: other keys, and older versions of keys that still
  have a current one, stay);
- ``check`` leaves no version of its probe object behind (written without lock headers,
  removed by version id), says when the bucket's default retention keeps it anyway, and warns
  (never fails) when a versioned bucket has no rule expiring noncurrent versions;
- prune aborts our multipart uploads older than a day (a backup killed mid-upload), only
  under the target's prefix and only for keys shaped ``<backup id>/<artifact>``.
"""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from conexa_backup import render
from conexa_backup.actions import setup
from conexa_backup.actions.context import Context
from conexa_backup.actions.prune import prune as prune_action
from conexa_backup.storage.s3 import S3Target
from conexa_backup.testing.emulators import S3Server
from tests.conftest import S3_BUCKET, Workspace
from tests.test_prune import config_of, old_id, seed, target_named
from tests.test_trust import backup_json, s3_target_toml
from tests.test_trust import locked_bucket as locked_bucket  # a fixture, used by name

MiB = 1 << 20


def prune_json(ws: Workspace, *args: str) -> dict[str, Any]:
    """``prune --target s3 --json`` (exit 0), the s3 entry."""
    result = ws.run("prune", "--target", "s3", "--json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    entry: dict[str, Any] = json.loads(result.stdout)[0]
    assert entry["target"] == "s3"
    return entry


def prune_text(ws: Workspace, *args: str) -> str:
    result = ws.run("prune", "--target", "s3", *args, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def versions_of(client: Any, bucket: str, prefix: str) -> tuple[list[Any], list[Any]]:
    """(versions, delete markers) of the keys under ``prefix``."""
    listing = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return listing.get("Versions", []), listing.get("DeleteMarkers", [])


def check_entry(ws: Workspace, name: str = "target s3") -> dict[str, Any]:
    result = ws.run("check", "--json")
    report = json.loads(result.stdout)
    entry: dict[str, Any] = next(c for c in report["checks"] if c["name"] == name)
    return entry


def locked_target(ws: Workspace, s3_server: S3Server, bucket: str, mode: str, *,
                  days: int) -> tuple[str, Any]:
    """Config: ``keep_last = 1`` and an S3 target locking ``mode`` for ``days``; one backup
    made (not pruned). Returns its id and the S3 target."""
    ws.write_config("[retention]\nkeep_last = 1\n" + s3_target_toml(
        s3_server, bucket, f'object_lock_mode = "{mode}"\nobject_lock_days = {days}\n'))
    return backup_json(ws, "--no-prune")["id"], target_named(ws, "s3")


# -- hidden, not deleted -----------------------------------------------------------------------

def test_prune_reports_locked_copies_as_hidden_not_deleted(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    source, s3 = locked_target(ws, s3_server, locked_bucket, "COMPLIANCE", days=2)
    first, second = old_id(3), old_id(2)
    seed(s3, ws.backups / source, first)
    before = datetime.now(UTC)

    preview = prune_text(ws, "--dry-run")
    assert f"{first}" in preview and "would hide (locked until 20" in preview, preview
    text = prune_text(ws)
    row = next(line for line in text.splitlines() if first in line)
    assert "hidden (locked until 20" in row and "deleted (" not in row, text

    seed(s3, ws.backups / source, second)
    entry = prune_json(ws)
    assert entry["deleted"] == [], entry
    [hidden] = entry["hidden"]
    assert hidden["id"] == second
    until = datetime.fromisoformat(hidden["locked_until"].replace("Z", "+00:00"))
    assert before + timedelta(days=2, minutes=-2) <= until <= datetime.now(UTC) + \
        timedelta(days=2, minutes=2), hidden
    versions, markers = versions_of(s3_server.client(), locked_bucket, f"{second}/")
    assert versions and markers  # the bucket keeps them: hidden is the truth
    assert {c["id"] for c in json.loads(ws.run("list", "--json").stdout)} == {source}


def _expire_now(client: Any, bucket: str, key: str, version: str) -> datetime:
    """Shorten a GOVERNANCE lock to a second from now (as an admin can); returns that time."""
    until = datetime.now(UTC) + timedelta(seconds=1)
    client.put_object_retention(Bucket=bucket, Key=key, VersionId=version,
                                Retention={"Mode": "GOVERNANCE", "RetainUntilDate": until},
                                BypassGovernanceRetention=True)
    return until


def test_prune_removes_hidden_versions_once_their_lock_has_passed(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    source, s3 = locked_target(ws, s3_server, locked_bucket, "GOVERNANCE", days=1)
    old = old_id(3)
    seed(s3, ws.backups / source, old)
    assert [h["id"] for h in prune_json(ws)["hidden"]] == [old]
    client = s3_server.client()

    # Not ours: a hidden version of a foreign key, and an older version of one of our keys
    # that still has a current version (perhaps the good copy under an overwrite): both stay.
    lock = {"ObjectLockMode": "GOVERNANCE",
            "ObjectLockRetainUntilDate": datetime.now(UTC) + timedelta(days=1)}
    client.put_object(Bucket=locked_bucket, Key="notes.txt", Body=b"not ours", **lock)
    client.delete_object(Bucket=locked_bucket, Key="notes.txt")
    drill_key = f"{source}/drill.json"
    for body in (b"{}", b'{"again": 1}'):
        client.put_object(Bucket=locked_bucket, Key=drill_key, Body=body, **lock)

    hidden, _ = versions_of(client, locked_bucket, f"{old}/")
    expiring = [(v["Key"], v["VersionId"]) for v in hidden]
    expiring += [(v["Key"], v["VersionId"]) for v in versions_of(client, locked_bucket,
                                                                 "notes.txt")[0]]
    expiring += [(v["Key"], v["VersionId"]) for v in versions_of(client, locked_bucket,
                                                                 drill_key)[0]
                 if not v["IsLatest"]]
    passed = max(_expire_now(client, locked_bucket, k, v) for k, v in expiring)

    # Still locked: nothing to remove yet.
    early = prune_action(Context(config_of(ws)), ["s3"], dry_run=True, at=passed - timedelta(
        seconds=5))
    assert early[0].expired_versions == 0
    while datetime.now(UTC) <= passed:  # the store judges locks by its own (real) clock
        pass
    preview = prune_json(ws, "--dry-run")
    assert preview["expired_versions"] == len(hidden)
    assert len(versions_of(client, locked_bucket, f"{old}/")[0]) == len(hidden)

    entry = prune_json(ws)
    assert entry["expired_versions"] == len(hidden), entry
    assert entry["deleted"] == [] and entry["hidden"] == [] and entry["warnings"] == []
    versions, markers = versions_of(client, locked_bucket, f"{old}/")
    assert versions == [] and markers == []  # the delete markers went with their versions
    assert len(versions_of(client, locked_bucket, "notes.txt")[0]) == 1
    assert len(versions_of(client, locked_bucket, drill_key)[0]) == 2
    assert {c["id"] for c in json.loads(ws.run("list", "--json").stdout)} == {source}


# -- check's probe -----------------------------------------------------------------------------

def test_check_leaves_no_probe_version_and_warns_without_a_lifecycle_rule(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    ws.write_config(s3_target_toml(
        s3_server, locked_bucket, 'object_lock_mode = "COMPLIANCE"\nobject_lock_days = 2\n'))
    entry = check_entry(ws)
    assert entry["ok"], entry
    assert versions_of(s3_server.client(), locked_bucket, "conexa-probe") == ([], [])
    [warning] = entry["warnings"]
    assert "noncurrent" in warning and "lifecycle" in warning, warning
    text = ws.run("check").stdout
    assert "warning" in text and "noncurrent" in text, text

    s3_server.client().put_bucket_lifecycle_configuration(
        Bucket=locked_bucket, LifecycleConfiguration={"Rules": [{
            "ID": "expire-hidden", "Status": "Enabled", "Filter": {"Prefix": ""},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 7}}]})
    entry = check_entry(ws)
    assert entry["ok"] and entry["warnings"] == [], entry


def test_check_says_when_the_default_retention_keeps_its_probe(
        ws: Workspace, s3_server: S3Server, locked_bucket: str) -> None:
    client = s3_server.client()
    client.put_object_lock_configuration(Bucket=locked_bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled",
        "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    client.put_bucket_lifecycle_configuration(
        Bucket=locked_bucket, LifecycleConfiguration={"Rules": [{
            "ID": "expire-hidden", "Status": "Enabled", "Filter": {"Prefix": ""},
            "NoncurrentVersionExpiration": {"NoncurrentDays": 7}}]})
    ws.write_config(s3_target_toml(s3_server, locked_bucket))
    entry = check_entry(ws)
    assert entry["ok"], entry  # the target works: a 64-byte leftover is said, not a failure
    [warning] = entry["warnings"]
    assert "conexa-probe-" in warning and "locked until 20" in warning, warning
    versions, _ = versions_of(client, locked_bucket, "conexa-probe")
    assert len(versions) == 1 and not versions[0]["IsLatest"]  # hidden, as the warning says


def test_check_does_not_fail_when_the_lifecycle_cannot_be_read(
        ws: Workspace, s3_server: S3Server, locked_bucket: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket policy denying s3:GetLifecycleConfiguration (moto does not enforce policies:
    the refusal is made here, where the target calls the API)."""
    from botocore.exceptions import ClientError

    real_call = S3Target.call

    def call(self: S3Target, method: str, **kwargs: Any) -> Any:
        if method == "get_bucket_lifecycle_configuration":
            raise self._error(ClientError({"Error": {"Code": "AccessDenied",
                                                     "Message": "Access Denied"}}, method), None)
        return real_call(self, method, **kwargs)

    monkeypatch.setattr(S3Target, "call", call)
    ws.write_config(s3_target_toml(s3_server, locked_bucket))
    results = {r.name: r for r in setup.check(Context(config_of(ws)))}
    target = results["target s3"]
    assert target.ok, target
    [warning] = target.warnings
    assert "lifecycle" in warning and "access denied" in warning.lower(), warning


# -- abandoned multipart uploads ---------------------------------------------------------------

def _uploads(client: Any, prefix: str = "") -> set[str]:
    listing = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=prefix)
    return {u["Key"] for u in listing.get("Uploads", [])}


def test_prune_aborts_our_abandoned_multipart_uploads_only(
        ws: Workspace, s3_server: S3Server) -> None:
    prefix = f"leftovers-{os.getpid()}"
    ws.write_config(f'[[targets]]\nname = "s3"\ntype = "s3"\nbucket = "{S3_BUCKET}"\n'
                    f'endpoint_url = "{s3_server.endpoint}"\nprefix = "{prefix}"\n'
                    f'retention = {{ keep_daily = 2 }}\n')
    client = s3_server.client()
    backup_id = old_id(3)  # exists only as this upload: no object at all
    ours = f"{prefix}/{backup_id}/database.dump.zst"
    # A backup killed mid-upload: the first part is sent, then nothing (no commit, no abort).
    upload = target_named(ws, "s3").writer(f"{backup_id}/database.dump.zst")
    upload.write(bytes(16 * MiB))
    foreign = {f"{prefix}/notes/big.bin", f"{prefix}/{backup_id}/other.bin",
               f"{prefix}/not-an-id/database.dump.zst", f"{prefix}x/{backup_id}/database.dump.zst",
               f"{backup_id}/database.dump.zst"}
    for key in foreign:
        client.create_multipart_upload(Bucket=S3_BUCKET, Key=key)
    assert _uploads(client) >= {ours, *foreign}
    listing = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=ours)
    started = listing["Uploads"][0]["Initiated"].astimezone(UTC)  # moto: a fixed past date

    young = prune_action(Context(config_of(ws)), ["s3"], dry_run=True,
                         at=started + timedelta(hours=1))
    assert young[0].aborted_uploads == 0

    later = started + timedelta(days=2)
    preview = prune_json(ws, "--at", later.isoformat())
    assert preview["aborted_uploads"] == 1 and preview["errors"] == [], preview
    assert "would abort 1 abandoned multipart upload" in prune_text(ws, "--at", later.isoformat())
    assert ours in _uploads(client)

    [result] = prune_action(Context(config_of(ws)), ["s3"], at=later)
    assert result.aborted_uploads == 1 and result.errors == [] and result.warnings == []
    assert render.prune_entry(result)["aborted_uploads"] == 1
    out = io.StringIO()
    render.prune_human(Console(file=out, width=200), [result], dry_run=False)
    assert "aborted 1 abandoned multipart upload" in out.getvalue(), out.getvalue()
    assert ours not in _uploads(client)
    assert _uploads(client) >= foreign
    for key in foreign:
        listing = client.list_multipart_uploads(Bucket=S3_BUCKET, Prefix=key)
        for u in listing.get("Uploads", []):
            client.abort_multipart_upload(Bucket=S3_BUCKET, Key=key, UploadId=u["UploadId"])
