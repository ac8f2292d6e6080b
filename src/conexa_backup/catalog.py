"""What the targets hold: backups grouped by id, complete only where a manifest is stored.

Only keys shaped ``<backup id>/<name>`` with a name we write (``manifest.OWNED_NAME``) are
ours; anything else on a target is ignored (and so never listed, restored or deleted).
"""

from __future__ import annotations

import base64
import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

from conexa_backup.crypto import SIGNATURE_NAME, TrustedKeys
from conexa_backup.errors import (
    BackupNotFoundError,
    ConexaError,
    IntegrityError,
    ObjectNotFoundError,
    SignatureError,
    StorageError,
    UsageError,
)
from conexa_backup.manifest import ID_PATTERN, MANIFEST_NAME, OWNED_NAME, Manifest, id_sort_key
from conexa_backup.state import (
    DAMAGED,
    Checks,
    Damage,
    atomic_write,
    checks,
    forget_copies,
    private_dir,
    record_damaged,
)
from conexa_backup.storage.base import ObjectInfo, Target

log = logging.getLogger(__name__)


def proves_damage(exc: BaseException) -> bool:
    """Whether ``exc`` proves a copy's stored bytes bad: the one rule verify, drills and
    restores use before recording a copy as damaged (``state.record_damaged``).

    Yes for a size or checksum mismatch, corrupt data and restore checks against the manifest
    (IntegrityError), and a missing object (ObjectNotFoundError). No for everything else: a
    timeout or a 503 (StorageError), an archive refused for safety, a key that does not fit
    (UnusableCopyError), a scratch server down, a full disk. Marking a good copy damaged on a
    network blip would take it out of retention's protection and get it pruned.
    """
    return isinstance(exc, IntegrityError | ObjectNotFoundError)


@dataclass
class Copy:
    """One backup's objects on one target."""

    target: Target
    objects: list[ObjectInfo]
    manifest: Manifest | None = None
    problem: str | None = None  # why a copy with a manifest file is still not usable
    damage: Damage | None = None  # found bad by a verify, drill or restore (state.checks)
    state_dir: Path | None = None  # where to record damage found while reading it
    signed_by: str | None = None  # the trusted key (crypto.key_id) its signature verified with
    refused_signature: bool = False  # its manifest was refused for its signature (a problem)

    @property
    def complete(self) -> bool:
        """It has a readable manifest (it may still be known damaged: see :attr:`state`)."""
        return self.manifest is not None

    @property
    def state(self) -> str:
        """``complete``; ``damaged`` (an unreadable manifest, or found bad by a verify, drill
        or restore and not verified since); ``incomplete`` (no manifest: a run in progress
        or an interrupted one). Every signal shows this."""
        if self.manifest is None:
            return "damaged" if self.problem else "incomplete"
        return "damaged" if self.damage is not None else "complete"

    @property
    def why_damaged(self) -> tuple[str | None, str] | None:
        """(when, why) for a damaged copy; None otherwise."""
        if self.manifest is None:
            return (None, self.problem) if self.problem else None
        return (self.damage.at, self.damage.why) if self.damage is not None else None

    @property
    def reason(self) -> str | None:
        """What kind of damage a damaged copy has: ``signature`` (its manifest refused for
        its signature: none, altered, or a key not trusted here), ``manifest`` (unreadable
        or invalid), ``data`` (found bad by a check, or by its listing); None otherwise."""
        if self.state != "damaged":
            return None
        if self.manifest is None:
            return "signature" if self.refused_signature else "manifest"
        return "data"

    def seen_bad(self, exc: Exception) -> None:
        """Record that reading this copy found it corrupt or missing a file (``exc``, see
        :func:`proves_damage`), so status, list and prune know before the next verify. Other
        failures say nothing about the stored bytes; recording is best
        effort and never hides the read's own error."""
        if self.state_dir is None or self.manifest is None or not proves_damage(exc):
            return
        try:
            record_damaged(self.state_dir, self.manifest.id, self.target.name, str(exc))
        except OSError as err:
            log.warning("could not record damaged copy: %s", err)

    def owned_keys(self, backup_id: str) -> list[str]:
        """Keys of objects we wrote in this copy, manifest first (delete in this order)."""
        manifest = f"{backup_id}/{MANIFEST_NAME}"
        keys = [o.key for o in self.objects if OWNED_NAME.match(o.key.partition("/")[2])]
        return sorted(keys, key=lambda k: k != manifest)


@dataclass
class Backup:
    """One backup id across every target."""

    id: str
    copies: list[Copy] = field(default_factory=list)

    @property
    def manifest(self) -> Manifest | None:
        return next((c.manifest for c in self.copies if c.manifest is not None), None)

    @property
    def signed_by(self) -> str | None:
        """The trusted key its manifest's signature verified with (the first copy's that
        did); None when no keys are configured, or no copy verified."""
        return next((c.signed_by for c in self.copies if c.signed_by is not None), None)

    @property
    def complete_copies(self) -> list[Copy]:
        return [c for c in self.copies if c.complete]

    @property
    def good_copies(self) -> list[Copy]:
        """Complete copies not known to be damaged."""
        return [c for c in self.copies if c.state == "complete"]

    @property
    def suspect(self) -> str | None:
        """Why its uploads look wrong (an empty or shrunken folder: a volume not mounted),
        as the backup recorded it; None when trusted."""
        manifest = self.manifest
        return manifest.uploads.suspect if manifest and manifest.uploads else None

    def trusts(self, copy: Copy) -> bool:
        """Whether ``copy`` can be counted on as this backup's good copy: complete, not known
        damaged, and the backup's uploads not suspect. The one rule status's age check,
        ``latest`` for a restore with uploads, and prune's protection use."""
        return copy.state == "complete" and self.suspect is None

    @property
    def trusted(self) -> bool:
        """It has a copy :meth:`trusts`."""
        return any(self.trusts(c) for c in self.copies)

    @property
    def status(self) -> str:
        """damaged if any copy is (see :attr:`Copy.state`); else complete if a copy is;
        else incomplete."""
        states = {c.state for c in self.copies}
        return next(s for s in ("damaged", "complete", "incomplete") if s in states)


class ManifestCache:
    """Manifests already read, kept in ``state_dir/cache``: once committed a manifest never
    changes, so listing a target with a year of backups costs one request, not hundreds.

    An entry is used only while the listing shows the manifest and its signature exactly as
    when they were cached (:func:`stamp`: sizes and versions); a signature is checked again
    on every use, so neither an edit on the target nor one in the cache goes unseen.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, target: str, backup_id: str) -> Path:
        return self.root / target / f"{backup_id}.entry.json"

    def get(self, target: str, backup_id: str, stamp: str) -> tuple[bytes, bytes | None] | None:
        """The cached (manifest, signature) if cached under ``stamp``; else None."""
        try:
            entry = json.loads(self._path(target, backup_id).read_bytes())
            if entry["stamp"] != stamp:
                return None
            signature = entry["signature"]
            return (base64.b64decode(entry["manifest"], validate=True),
                    None if signature is None else base64.b64decode(signature, validate=True))
        except (OSError, ValueError, KeyError, TypeError):  # absent or unreadable: a miss
            return None

    def put(self, target: str, backup_id: str, stamp: str, data: bytes,
            signature: bytes | None) -> None:
        entry = {"stamp": stamp, "manifest": base64.b64encode(data).decode(),
                 "signature": None if signature is None else base64.b64encode(signature).decode()}
        path = self._path(target, backup_id)
        try:
            private_dir(path.parent)
            atomic_write(path, json.dumps(entry).encode())
            path.with_name(f"{backup_id}.json").unlink(missing_ok=True)  # the old format's
        except OSError as exc:  # a cache: never worth failing a run for
            log.debug("manifest cache: %s", exc)


def stamp(manifest: ObjectInfo, signature: ObjectInfo | None) -> str:
    """What a listing says of a backup's manifest and signature objects: any change to either
    (size, version, time) changes it."""
    return json.dumps([[o.size, o.version, o.modified and o.modified.isoformat()]
                       for o in (manifest, signature) if o is not None])


def read_manifest(target: Target, backup_id: str, cache: ManifestCache | None = None,
                  listed: str | None = None, verifier: TrustedKeys | None = None) -> Manifest:
    """Read and validate ``<id>/manifest.json`` from ``target``, or from ``cache`` when the
    listing's :func:`stamp` (``listed``) matches the cached one.

    With ``verifier`` (the trusted Ed25519 public keys), the manifest must carry a valid
    signature by one of them (``manifest.json.sig``), checked on every read, cached or not;
    only manifests that passed are cached.

    Raises:
        ObjectNotFoundError: no manifest there. SignatureError: unsigned, altered, or signed
        by a key not trusted. IntegrityError: unreadable manifest.
    """
    return read_signed(target, backup_id, cache, listed, verifier)[0]


def read_signed(target: Target, backup_id: str, cache: ManifestCache | None = None,
                listed: str | None = None,
                verifier: TrustedKeys | None = None) -> tuple[Manifest, str | None]:
    """:func:`read_manifest`, and the id of the trusted key its signature verified with
    (None without ``verifier``). Raises as :func:`read_manifest`."""
    key = f"{backup_id}/{MANIFEST_NAME}"
    cached = cache.get(target.name, backup_id, listed) if cache and listed is not None else None
    if cached is not None:
        data, signature = cached
    else:
        with target.open(key) as fh:
            data = fh.read(16 << 20)  # a manifest is a few KB; refuse to slurp anything huge
        signature = _read_signature(target, backup_id) if verifier is not None else None
    signer = None
    if verifier is not None:
        signer = verifier.check(data, signature, f"target {target.name!r}: {key}")
    manifest = Manifest.from_json(data, f"target {target.name!r}: {key}")
    if manifest.id != backup_id:
        raise IntegrityError(f"target {target.name!r}: {key} describes backup {manifest.id}")
    if cached is None and cache is not None and listed is not None:
        cache.put(target.name, backup_id, listed, data, signature)
    return manifest, signer


def _read_signature(target: Target, backup_id: str) -> bytes | None:
    try:
        with target.open(f"{backup_id}/{SIGNATURE_NAME}") as fh:
            data: bytes = fh.read(4096)
            return data
    except ObjectNotFoundError:
        return None


def scan(targets: Sequence[Target], *, with_manifests: bool = True,
         unreachable: dict[str, str] | None = None,
         cache: ManifestCache | None = None, verifier: TrustedKeys | None = None,
         state_dir: Path | None = None) -> list[Backup]:
    """Every backup id found on ``targets``, oldest first.

    With ``state_dir``, each copy carries what checks found (:func:`state.checks`): its
    :attr:`Copy.damage`, and where to record damage found while reading it.

    A target that cannot be listed is skipped (one dead target must not hide the copies on
    the others) and its error recorded in ``unreachable`` when given.

    Raises:
        StorageError: every target failed to list (the first target's error).
    """
    backups: dict[str, Backup] = {}
    failed: dict[str, StorageError] = {}
    seen = checks(state_dir) if state_dir is not None else None
    for target in targets:
        grouped: dict[str, list[ObjectInfo]] = defaultdict(list)
        try:
            for obj in target.list():
                backup_id, sep, name = obj.key.partition("/")
                if sep and OWNED_NAME.match(name) and ID_PATTERN.fullmatch(backup_id):
                    grouped[backup_id].append(obj)
        except StorageError as exc:
            log.warning("%s", exc)
            failed[target.name] = exc
            continue
        if seen is not None and state_dir is not None:
            _forget_gone(state_dir, seen, target.name, grouped)
        for backup_id, objects in grouped.items():
            copy = Copy(target, objects, state_dir=state_dir,
                        damage=seen.damage(backup_id, target.name) if seen else None)
            named = {o.key.partition("/")[2]: o for o in objects}
            manifest, signature = named.get(MANIFEST_NAME), named.get(SIGNATURE_NAME)
            if manifest is not None and with_manifests and verifier is not None and not signature:
                copy.problem = f"target {target.name!r}: {backup_id}: manifest is not signed"
                copy.refused_signature = True
            elif manifest is not None and with_manifests:
                try:
                    copy.manifest, copy.signed_by = read_signed(
                        target, backup_id, cache, stamp(manifest, signature), verifier)
                except ConexaError as exc:
                    copy.problem = str(exc)
                    copy.refused_signature = isinstance(exc, SignatureError)
                    log.warning("%s", exc)
            if copy.manifest is not None and copy.damage is None:
                copy.damage = listed_damage(copy.manifest, named, target.name)
            backups.setdefault(backup_id, Backup(backup_id)).copies.append(copy)
    if targets and len(failed) == len(targets):
        raise next(iter(failed.values()))
    if unreachable is not None:
        unreachable.update({name: str(exc) for name, exc in failed.items()})
    return [backups[k] for k in sorted(backups, key=id_sort_key)]


def listed_damage(manifest: Manifest, named: dict[str, ObjectInfo],
                  target: str) -> Damage | None:
    """Damage the listing alone proves: a file the manifest names that is not stored, or is
    stored with another size. Seen at every scan (nothing to record), so list, status,
    prune, restore and download agree with what a verify would find, before one runs."""
    for artifact in manifest.artifacts:
        found = named.get(artifact.name)
        if found is None:
            why = f"{artifact.name} is missing"
        elif found.size != artifact.size:
            why = f"{artifact.name} has {found.size} bytes, the manifest says {artifact.size}"
        else:
            continue
        return Damage(datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                      f"target {target!r}: {manifest.id}: {why} (seen in its listing)")
    return None


def _forget_gone(state_dir: Path, seen: Checks, target: str, listed: Iterable[str]) -> None:
    """Drop the damage recorded for copies on ``target`` that its full listing no longer
    shows (deleted outside the tool): a copy that is gone is not a damaged copy, and would
    otherwise be counted (metrics, status) forever. Best effort: it is only a record."""
    present = set(listed)
    gone = [(i, t) for (i, t) in seen.damaged if t == target and i not in present]
    if gone:
        try:
            forget_copies(state_dir, gone, records=[DAMAGED])
        except OSError as exc:
            log.warning("could not update the damaged-copies record: %s", exc)


def refresh(backup: Backup, verifier: TrustedKeys | None = None) -> None:
    """Re-read each copy's manifest from its target (not the cache): what a restore, download
    or drill relies on must be what is stored now."""
    key = f"{backup.id}/{MANIFEST_NAME}"
    for copy in backup.copies:
        if not any(o.key == key for o in copy.objects):
            continue
        try:
            copy.manifest, copy.signed_by = read_signed(copy.target, backup.id,
                                                        verifier=verifier)
            copy.problem, copy.refused_signature = None, False
        except ConexaError as exc:
            copy.manifest, copy.problem = None, str(exc)
            copy.refused_signature = isinstance(exc, SignatureError)
            log.warning("%s", exc)


class Use(Enum):
    """What ``latest`` is wanted for; it decides which backups it may name (:func:`resolve`)."""

    RESTORE = "restore"  # a restore with uploads: a good copy, uploads not suspect
    DATABASE = "database"  # restore --only database: a good copy (its dump is fine if suspect)
    CHECK = "check"  # verify, drill, download: the newest as it is, so damage gets re-checked


def passed_over(backup: Backup, use: Use, source: str | None = None) -> str | None:
    """Why ``latest`` for ``use`` must not name this complete backup (the copy on ``source``
    only, when given): no copy there (CHECK), none not known damaged (DATABASE), or also its
    uploads suspect (RESTORE: restoring it would swap in an empty tree); None when it may."""
    copies = [c for c in backup.complete_copies if source in (None, c.target.name)]
    where = f" on target {source!r}" if source is not None else ""
    if not copies:
        return f"no complete copy{where}"
    if use is Use.CHECK:
        return None
    if not any(c.state == "complete" for c in copies):
        return f"every copy{where} is damaged"
    if use is Use.RESTORE and not any(backup.trusts(c) for c in copies):
        return f"its uploads are suspect ({backup.suspect})"
    return None


def resolve(backups: Sequence[Backup], ref: str, notes: list[str] | None = None, *,
            use: Use, source: str | None = None) -> Backup:
    """The complete backup named by ``ref``: an id, or ``latest``.

    ``latest`` is the newest scheduled backup that :func:`passed_over` accepts for ``use``
    (with ``source``, judging only its copy there). It skips safety backups (taken just
    before a restore, of the state being replaced), so that ``restore latest`` run twice
    never restores the bad state. Each newer backup it passes over (and, for CHECK, a
    damaged or suspect backup it names) is logged and, with ``notes``, said there (one line
    each: which and why), for the user to see.

    Raises:
        BackupNotFoundError: no backup has this id. UsageError: it has no complete copy;
        for ``latest``, no scheduled backup that qualifies (name one by its id).
    """
    complete = [b for b in backups if b.complete_copies]
    if ref == "latest":
        scheduled = [b for b in complete if b.manifest and b.manifest.kind == "scheduled"]
        if not scheduled:
            raise UsageError("no complete backup found on any target")
        skipped: list[str] = []
        for backup in reversed(scheduled):
            why = passed_over(backup, use, source)
            if why is None:
                break
            skipped.append(f"latest: passed over backup {backup.id}: {why}")
        else:
            raise UsageError("no good backup to call 'latest': " + "; ".join(skipped),
                             hint="name a backup by its id (see `conexa-backup list`)")
        if use is Use.CHECK and (why := passed_over(backup, Use.RESTORE, source)):
            skipped.append(f"latest: backup {backup.id} taken as it is, though {why}")
        for line in skipped:
            log.warning("%s", line)
        if notes is not None:
            notes += skipped
        return backup
    for backup in backups:
        if backup.id == ref:
            problems = [c.problem for c in backup.copies if c.problem]
            if not backup.complete_copies and problems:
                raise IntegrityError(f"backup {ref} is damaged: " + "; ".join(problems))
            if not backup.complete_copies:
                raise UsageError(f"backup {ref} is incomplete (no manifest on any target)")
            return backup
    raise BackupNotFoundError(f"no backup with id {ref!r} (see `conexa-backup list`)")
