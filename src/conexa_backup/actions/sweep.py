"""What prune clears on an S3 target besides backups: hidden versions whose Object Lock has
ended, and multipart uploads a killed backup never finished.

Only our keys, under the target's prefix: ``<backup id>/<name we write>`` (the catalog's rule,
``manifest.ID_PATTERN`` and ``manifest.OWNED_NAME``). Both are housekeeping: what fails here
is a warning, never a failed prune, and never stops the backups' own retention.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from conexa_backup.errors import StorageError
from conexa_backup.manifest import ID_PATTERN, OWNED_NAME
from conexa_backup.storage.s3 import S3Target
from conexa_backup.storage.s3_versions import (
    Version,
    abort_upload,
    delete_version,
    lock_of,
    pending_uploads,
    versioning,
    versions,
)

log = logging.getLogger(__name__)
# As for incomplete leftovers: a younger upload may be a backup in progress on another host.
STALE_UPLOAD = timedelta(days=1)
MAX_WARNINGS = 3  # one refused permission fails every object alike: say it, not a thousand times


def owned_id(key: str) -> str | None:
    """The backup id of one of our keys (relative to the target's prefix), else None."""
    backup_id, sep, name = key.partition("/")
    if sep and ID_PATTERN.fullmatch(backup_id) and OWNED_NAME.fullmatch(name):
        return backup_id
    return None


@dataclass
class VersionSweep:
    """Hidden versions of our keys: those still kept, by backup id (until the latest lock
    date among them; None when none is locked: kept by versioning alone, for a lifecycle rule
    to expire), how many were removed (or, in a dry run, would be), and what went wrong."""

    hidden: dict[str, datetime | None] = field(default_factory=dict)
    expired: int = 0
    warnings: list[str] = field(default_factory=list)

    def keep(self, backup_id: str, until: datetime | None) -> None:
        before = self.hidden.get(backup_id)
        if backup_id not in self.hidden or (until is not None and
                                            (before is None or until > before)):
            self.hidden[backup_id] = until


def sweep_versions(target: S3Target, now: datetime, *, dry_run: bool) -> VersionSweep:
    """Remove the hidden versions of our keys whose retain-until date is before ``now``.

    A hidden version is a noncurrent one of a key whose current version is a delete marker
    (a deleted copy). Older versions of a key that still has a current object are left alone:
    after an overwrite they may be the good copy. So is a version with no retain-until date
    (a versioned bucket without Object Lock: the operator's lifecycle rule decides), or under
    legal hold. Deletes are by version id and never bypass a lock: the store refuses what is
    still locked by its own clock. A key left with nothing but its delete marker loses the
    marker too, so version listings do not grow with every pruned backup. A dry run only
    counts (the HEADs are reads).

    Never raises: what the store refuses or fails is a warning in the result.
    """
    sweep = VersionSweep()
    # A bucket that never had versioning (the usual case) hides nothing: one cheap request
    # instead of listing every object again. Unknown (refused): look anyway.
    if _versioning_or_unknown(target) is None:
        return sweep
    by_key: dict[str, list[Version]] = defaultdict(list)
    try:
        for v in versions(target):
            if owned_id(v.key):
                by_key[v.key].append(v)
    except StorageError as exc:
        sweep.warnings.append(f"hidden versions not looked at: {exc}")
        return sweep
    for key, found in sorted(by_key.items()):
        if any(v.latest and v.marker for v in found):
            _sweep_key(target, key, found, now, dry_run, sweep)
    sweep.warnings = _capped(sweep.warnings)
    return sweep


def _versioning_or_unknown(target: S3Target) -> str | None:
    try:
        return versioning(target)
    except StorageError:
        return "unknown"


def _sweep_key(target: S3Target, key: str, found: list[Version], now: datetime, dry_run: bool,
               sweep: VersionSweep) -> None:
    """One hidden key: its expired versions go; its markers too once nothing is left."""
    backup_id = owned_id(key)
    assert backup_id is not None
    left = 0
    for v in (v for v in found if not v.marker):
        try:
            lock = lock_of(target, key, v.version_id)
            if lock.legal_hold or lock.until is None or lock.until > now:
                sweep.keep(backup_id, lock.until)
                left += 1
                continue
            if not dry_run:
                delete_version(target, key, v.version_id)
                log.info("removed %s version %s of %s: its lock ended %s", target.name,
                         v.version_id, key, lock.until)
            sweep.expired += 1
        except StorageError as exc:
            sweep.warnings.append(f"{key} version {v.version_id}: {exc}")
            sweep.keep(backup_id, None)
            left += 1
    if left or dry_run:
        return
    for marker in (v for v in found if v.marker):
        try:
            delete_version(target, key, marker.version_id)
        except StorageError as exc:  # a marker costs next to nothing: say it and move on
            sweep.warnings.append(f"{key} delete marker: {exc}")


def abort_stale_uploads(target: S3Target, now: datetime, *,
                        dry_run: bool) -> tuple[int, list[str]]:
    """Abort our multipart uploads started more than a day before ``now`` (a backup killed
    mid-upload leaves one, billed until aborted); in a dry run only count them. An upload
    whose start the store does not say is left alone: never judged old by a guess.

    Returns how many were aborted (would be), and warnings. Never raises: what the store
    refuses or fails is one of the warnings.
    """
    try:
        stale = [u for u in pending_uploads(target)
                 if owned_id(u.key) and u.initiated is not None
                 and u.initiated < now - STALE_UPLOAD]
    except StorageError as exc:
        return 0, [f"unfinished uploads not looked at: {exc}"]
    aborted, warnings = 0, []
    for upload in stale:
        if not dry_run:
            try:
                abort_upload(target, upload.key, upload.upload_id)
            except StorageError as exc:
                warnings.append(f"{upload.key} upload {upload.upload_id}: {exc}")
                continue
            log.info("aborted the multipart upload of %s on %s, started %s", upload.key,
                     target.name, upload.initiated)
        aborted += 1
    return aborted, _capped(warnings)


def _capped(warnings: list[str]) -> list[str]:
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    return [*warnings[:MAX_WARNINGS], f"and {len(warnings) - MAX_WARNINGS} more like these"]
