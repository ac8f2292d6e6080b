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

import json
from typing import Any

import pytest

from conexa_backup.actions import setup
from conexa_backup.actions.context import Context
from conexa_backup.storage.s3 import S3Target
from conexa_backup.testing.emulators import S3Server
from tests.conftest import Workspace
from tests.test_prune import config_of
from tests.test_trust import s3_target_toml
from tests.test_trust import locked_bucket as locked_bucket  # a fixture, used by name


def versions_of(client: Any, bucket: str, prefix: str) -> tuple[list[Any], list[Any]]:
    """(versions, delete markers) of the keys under ``prefix``."""
    listing = client.list_object_versions(Bucket=bucket, Prefix=prefix)
    return listing.get("Versions", []), listing.get("DeleteMarkers", [])


def check_entry(ws: Workspace, name: str = "target s3") -> dict[str, Any]:
    result = ws.run("check", "--json")
    report = json.loads(result.stdout)
    entry: dict[str, Any] = next(c for c in report["checks"] if c["name"] == name)
    return entry


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
