"""What an S3 bucket keeps beside the current objects: old versions, delete markers, unfinished
multipart uploads, and the lifecycle rules that expire them.

On a versioned bucket (every bucket with Object Lock is one) a plain DELETE only puts a delete
marker on top: the version under it stays, and is billed, until someone deletes it by version
id or a lifecycle rule expires it. An upload that was never completed nor aborted (a backup
killed mid-upload) is invisible and billed until it is aborted. These are the primitives that
``prune`` and ``check`` use to see and remove them; which of them may be removed is theirs to
decide. Keys here are relative to the target's prefix, like everywhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from conexa_backup.errors import StorageError
from conexa_backup.storage.s3 import S3Target


@dataclass(frozen=True)
class Version:
    """One version of a key, or a delete marker (``marker``); ``latest``: the current one."""

    key: str
    version_id: str
    latest: bool
    marker: bool


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime | None


@dataclass(frozen=True)
class Lock:
    """What keeps one version: its retain-until date (None: no retention) and a legal hold."""

    until: datetime | None
    legal_hold: bool


def versioning(target: S3Target) -> str | None:
    """The bucket's versioning: ``"Enabled"`` (always, with Object Lock), ``"Suspended"``
    (old versions may remain) or None (never enabled: a delete deletes).

    Raises:
        StorageError: refused (s3:GetBucketVersioning) or failed.
    """
    status = target.call("get_bucket_versioning").get("Status")
    return status if status in ("Enabled", "Suspended") else None


def versions(target: S3Target, prefix: str = "") -> Iterator[Version]:
    """Every version and delete marker under ``prefix`` (an unversioned bucket lists each
    object once, as its latest, with version id ``null``).

    Raises:
        StorageError: the listing was refused (s3:ListBucketVersions) or failed.
    """
    cut = len(target.prefix)
    for page in target.pages("list_object_versions", prefix):
        for marker, entries in ((False, page.get("Versions", [])),
                                (True, page.get("DeleteMarkers", []))):
            for v in entries:
                yield Version(v["Key"][cut:], v["VersionId"], bool(v.get("IsLatest")), marker)


def lock_of(target: S3Target, key: str, version_id: str) -> Lock:
    """The Object Lock retention and legal hold of one version (a HEAD by version id: a
    listing does not say them).

    Raises:
        StorageError: the HEAD was refused or failed.
    """
    head = target.call("head_object", Key=target.full_key(key), VersionId=version_id)
    until = head.get("ObjectLockRetainUntilDate")
    return Lock(until if isinstance(until, datetime) else None,
                head.get("ObjectLockLegalHoldStatus") == "ON")


def delete_version(target: S3Target, key: str, version_id: str) -> None:
    """Delete one version (or delete marker) for good. Never bypasses a GOVERNANCE lock.

    Raises:
        StorageError: refused (a version still locked: AccessDenied) or failed.
    """
    target.call("delete_object", Key=target.full_key(key), VersionId=version_id)


def pending_uploads(target: S3Target, prefix: str = "") -> Iterator[PendingUpload]:
    """Unfinished multipart uploads under ``prefix``.

    Raises:
        StorageError: the listing was refused (s3:ListBucketMultipartUploads) or failed.
    """
    cut = len(target.prefix)
    for page in target.pages("list_multipart_uploads", prefix):
        for u in page.get("Uploads", []):
            started = u.get("Initiated")
            yield PendingUpload(u["Key"][cut:], u["UploadId"],
                                started if isinstance(started, datetime) else None)


def abort_upload(target: S3Target, key: str, upload_id: str) -> None:
    """Abort one multipart upload, freeing its parts.

    Raises:
        StorageError: refused or failed (an upload already gone is NoSuchUpload).
    """
    target.call("abort_multipart_upload", Key=target.full_key(key), UploadId=upload_id)


def purge(target: S3Target, key: str) -> None:
    """Remove ``key`` with every version and delete marker it has (``check``'s probe).

    Raises:
        StorageError: a version could not be removed (a bucket default retention locks it:
            the message says until when), or the versions could not be listed.
    """
    target.delete(key)
    try:
        found = [v for v in versions(target, key) if v.key == key]  # not longer keys
    except StorageError as exc:
        raise StorageError(target.name, f"{key} deleted, but its versions could not be listed "
                                        f"({exc}): a versioned bucket may keep it hidden") from None
    kept = []
    for v in (v for v in found if not v.marker):
        try:
            delete_version(target, key, v.version_id)
        except StorageError as exc:
            lock = _lock_or_none(target, key, v.version_id)
            kept.append(f"locked until {_iso(lock.until)}" if lock and lock.until
                        else f"{exc}")
    if kept:  # the delete marker stays: the probe remains hidden, not listed again
        raise StorageError(target.name, f"{key} could not be removed ({'; '.join(kept)}): the "
                                        f"bucket keeps it hidden behind a delete marker")
    for v in (v for v in found if v.marker):
        delete_version(target, key, v.version_id)


def _lock_or_none(target: S3Target, key: str, version_id: str) -> Lock | None:
    try:
        return lock_of(target, key, version_id)
    except StorageError:
        return None


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def lifecycle_warnings(target: S3Target) -> list[str]:
    """Why old versions of our objects might pile up on this bucket: it keeps versions
    (versioning on or suspended, as with Object Lock) and no enabled lifecycle rule covering
    our prefix expires noncurrent versions. A refused or failed read (a bucket policy denying
    s3:GetBucketVersioning or s3:GetLifecycleConfiguration) is one warning, never an error:
    the target works, we only cannot tell. Returns nothing to say as an empty list.
    """
    try:
        status = versioning(target)
    except StorageError as exc:
        return [f"cannot tell whether the bucket keeps old versions ({exc})"]
    if status is None:
        return []
    try:
        rules = target.call("get_bucket_lifecycle_configuration").get("Rules", [])
    except StorageError as exc:
        if "NoSuchLifecycleConfiguration" not in str(exc):
            return [f"cannot read the bucket's lifecycle rules ({exc}): make sure one expires "
                    f"noncurrent versions (see README, Object Lock)"]
        rules = []
    if any(_expires_noncurrent(rule, target.prefix) for rule in rules):
        return []
    return [f"versioning is {status.lower()} and no lifecycle rule expires noncurrent "
            f"versions under {target.prefix or 'the bucket root'}: prune removes the hidden "
            f"versions of its own backups once their Object Lock ends; other old versions "
            f"(never locked, or not ours) stay, billed, until a rule expires them (see "
            f"README, Object Lock)"]


def _expires_noncurrent(rule: dict[str, object], prefix: str) -> bool:
    """Whether an enabled lifecycle rule expires noncurrent versions of every object under
    ``prefix`` (a tag or size filter: not every object, so not counted)."""
    if rule.get("Status") != "Enabled" or not rule.get("NoncurrentVersionExpiration"):
        return False
    raw = rule.get("Filter", {"Prefix": rule.get("Prefix", "")})
    filt = raw if isinstance(raw, dict) else {}
    and_ = filt.get("And")
    if isinstance(and_, dict):
        if and_.get("Tags") or "ObjectSizeGreaterThan" in and_ or "ObjectSizeLessThan" in and_:
            return False
        filt = and_
    if set(filt) - {"Prefix"}:
        return False  # Tag, ObjectSizeGreaterThan, ObjectSizeLessThan
    return prefix.startswith(str(filt.get("Prefix") or ""))
