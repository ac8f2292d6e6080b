"""One stored file of a backup, for the API's download: chosen, opened, streamed, checked.

No web imports. The copy is chosen as restores choose it (:func:`fetch.from_first_good`:
copies not known damaged first, in target order, or the one target asked for); a copy whose
listing already shows the wrong size, or that cannot be opened, is passed over before any
byte is sent. Once streaming has started there is no going back to another copy, so
:func:`stream` holds back the last chunk until the whole object's size and SHA-256 match the
manifest: a damaged copy ends in an exception (the connection is dropped by the server),
never in a response that looks complete.

A byte range is served by reading the object from its start (hashing and discarding what
precedes the range) and on to its end after it (hashing what follows): a resumed download
costs a re-read of the part already fetched, but every byte sent is still proved good.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from conexa_backup.actions.context import Context
from conexa_backup.actions.fetch import from_first_good
from conexa_backup.catalog import Backup, Copy, Use
from conexa_backup.errors import ConexaError, IntegrityError, UsageError
from conexa_backup.manifest import MANIFEST_NAME, Artifact, Manifest
from conexa_backup.pipeline import CHUNK
from conexa_backup.storage.base import Presigning

log = logging.getLogger(__name__)

MANIFEST = "manifest"
# What ``?artifact=`` may name: an artifact kind of the manifest, or the manifest itself.
WORDS = ("database", "uploads", "globals", "uploads-index", MANIFEST)
PRESIGN_SECONDS = 300
MAX_MANIFEST = 16 << 20  # as catalog.read_manifest: a manifest is a few KB


class ArtifactNotFoundError(UsageError):
    """The backup has no artifact of that kind (no uploads configured, say)."""


@dataclass
class Stored:
    """One stored object of a backup, opened on the copy chosen to serve it.

    ``reader`` is open (the caller streams it with :func:`stream` or closes it); for the
    manifest, ``data`` holds its bytes as stored instead. ``url`` is set instead of both
    when the copy's target pre-signed a GET for the caller to fetch directly.
    """

    backup_id: str
    copy: Copy
    name: str  # the object's name in the backup's folder (database.dump.zst...)
    size: int
    sha256: str
    reader: BinaryIO | None = None
    data: bytes | None = None
    url: str | None = None
    artifact: Artifact | None = None  # None for the manifest


def find(ctx: Context, backup_id: str, source: str | None = None) -> Backup:
    """The complete backup ``backup_id`` (an id, never ``latest``), manifests re-read.

    Raises:
        BackupNotFoundError: no such backup. UsageError: incomplete, or no complete copy
        on ``source`` (or ``source`` unknown). IntegrityError: every manifest is damaged.
        StorageError: ``source`` (or every target) cannot be listed.
    """
    try:
        return ctx.resolve(backup_id, source, use=Use.CHECK)
    except UsageError:
        if source is not None:  # a target that is down shows no copy: say it is down
            for _ in ctx.targets([source])[0].list(f"{backup_id}/"):
                break
        raise


def artifact_of(manifest: Manifest, word: str) -> Artifact:
    """The artifact ``word`` names in ``manifest``.

    Raises:
        UsageError: ``word`` is not one of :data:`WORDS`. ArtifactNotFoundError: the
        backup has none of that kind.
    """
    if word not in WORDS or word == MANIFEST:
        raise UsageError(f"unknown artifact {word!r}: use one of {', '.join(WORDS)}")
    found = manifest.artifact(word)
    if found is None:
        raise ArtifactNotFoundError(f"backup {manifest.id} has no {word} artifact")
    return found


def open_stored(backup: Backup, word: str, source: str | None = None,
                presign: bool = False) -> Stored:
    """Open ``word`` (see :data:`WORDS`) of ``backup`` on its first good copy (``source``:
    only that target's). With ``presign``, a copy on a target that can pre-sign is answered
    with a URL valid :data:`PRESIGN_SECONDS` instead (not the manifest: it is served here).

    Raises:
        UsageError, ArtifactNotFoundError: as :func:`artifact_of`.
        IntegrityError: every copy is damaged or missing the file (each recorded damaged).
        StorageError: no copy could be read.
    """
    if word not in WORDS:
        raise UsageError(f"unknown artifact {word!r}: use one of {', '.join(WORDS)}")
    if word == MANIFEST:
        return from_first_good(backup, lambda copy, _: _manifest(backup.id, copy), source)
    manifest = backup.manifest
    assert manifest is not None  # find() returns complete backups only
    artifact_of(manifest, word)  # an unknown kind is the caller's mistake, not a bad copy

    def attempt(copy: Copy, manifest: Manifest) -> Stored:
        artifact = artifact_of(manifest, word)
        key = f"{backup.id}/{artifact.name}"
        listed = next((o for o in copy.objects if o.key == key), None)
        if listed is not None and listed.size != artifact.size:  # damaged: say so at once
            raise IntegrityError(f"target {copy.target.name!r}: {key}: size {listed.size} "
                                 f"bytes, manifest says {artifact.size}")
        found = Stored(backup.id, copy, artifact.name, artifact.size, artifact.sha256,
                       artifact=artifact)
        # Only a copy not known damaged is handed out by URL: the client would get its bytes
        # unchecked; a suspect one is proxied, so the SHA-256 check decides.
        if presign and copy.state == "complete" and isinstance(copy.target, Presigning):
            found.url = copy.target.presign(key, PRESIGN_SECONDS)
            if found.url is not None:
                return found
            log.info("target %r cannot pre-sign URLs here: proxying %s", copy.target.name, key)
        found.reader = copy.target.open(key)
        return found

    return from_first_good(backup, attempt, source)


def _manifest(backup_id: str, copy: Copy) -> Stored:
    with copy.target.open(f"{backup_id}/{MANIFEST_NAME}") as fh:
        data = fh.read(MAX_MANIFEST)
    Manifest.from_json(data, f"target {copy.target.name!r}: {backup_id}/{MANIFEST_NAME}")
    return Stored(backup_id, copy, MANIFEST_NAME, len(data), hashlib.sha256(data).hexdigest(),
                  data=data)


def stream(found: Stored, first: int, last: int) -> Iterator[bytes]:
    """Yield bytes ``first``..``last`` (inclusive) of ``found``, in chunks of at most
    :data:`pipeline.CHUNK`, reading and hashing the whole object; the last chunk is
    yielded only once the size and SHA-256 match the manifest. Closes the reader.

    Raises:
        IntegrityError: the stored object is not what the manifest says (the copy is
        recorded damaged first). StorageError: a read failed.
    """
    if found.data is not None:
        yield from _slices(found.data, first, last)
        return
    assert found.reader is not None
    where = f"target {found.copy.target.name!r}: {found.backup_id}/{found.name}"
    digest, pos, pending = hashlib.sha256(), 0, b""
    try:
        while data := found.reader.read(CHUNK):
            digest.update(data)
            start, pos = pos, pos + len(data)
            if pos > found.size:
                break  # longer than the manifest says: no need to read on
            lo, hi = max(first, start), min(last + 1, pos)
            if lo < hi:
                if pending:
                    yield pending
                pending = data if (lo, hi) == (start, pos) else data[lo - start:hi - start]
        problem = _mismatch(pos, digest.hexdigest(), found)
        if problem is not None:
            exc = IntegrityError(f"{where}: {problem}")
            found.copy.seen_bad(exc)
            raise exc
    finally:
        found.reader.close()
    if pending:
        yield pending


def _mismatch(size: int, sha256: str, found: Stored) -> str | None:
    """How what was read differs from the manifest (a size past it: read stopped there)."""
    if size > found.size:
        return f"size over {found.size} bytes, manifest says {found.size}"
    if size < found.size:
        return f"size {size} bytes, manifest says {found.size}"
    if sha256 != found.sha256:
        return f"SHA-256 {sha256} does not match the manifest"
    return None


def _slices(data: bytes, first: int, last: int) -> Iterator[bytes]:
    for start in range(first, last + 1, CHUNK):
        yield data[start:min(start + CHUNK, last + 1)]


def close(found: Stored) -> None:
    """Close ``found``'s reader, if any (a response that will not stream it)."""
    if found.reader is not None:
        with contextlib.suppress(OSError, ConexaError):
            found.reader.close()
