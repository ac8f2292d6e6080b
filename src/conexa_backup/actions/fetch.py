"""Reading a backup back: every byte checked against the manifest, with fallback.

``read_verified`` streams one artifact from one copy through a hash; ``from_first_good`` tries
each complete copy in turn (targets in config order, so local first by default) and moves on
when a copy is missing or corrupt, so one bad disk never stops a restore.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

from conexa_backup.catalog import Backup, Copy, proves_damage
from conexa_backup.crypto import decrypt_to
from conexa_backup.errors import (
    ConexaError,
    IntegrityError,
    StorageError,
    UnsafeArchiveError,
    UnusableCopyError,
)
from conexa_backup.manifest import Artifact, Manifest
from conexa_backup.pipeline import HashingReader, copy_stream, decompressing_reader

log = logging.getLogger(__name__)
T = TypeVar("T")

INTACT = "stored bytes match the manifest"


def _intact(reader: HashingReader, artifact: Artifact) -> bool:
    """Whether the whole object (read to its end now) matches the manifest."""
    try:
        reader.check(artifact.size, artifact.sha256, "")
    except IntegrityError:
        return False
    return True


def read_verified(copy: Copy, backup_id: str, artifact: Artifact,
                  consume: Callable[[BinaryIO], T]) -> T:
    """Run ``consume`` on the artifact's stored bytes, then check size and SHA-256.

    ``consume`` must treat what it produced as provisional until this returns: on a mismatch
    it raises after ``consume`` ran. When ``consume`` fails on what it read (undecryptable,
    an unsafe archive member...), the rest is read too: a damaged copy is reported as
    damaged (IntegrityError), an intact one with ``consume``'s reason as another error, so
    that "no good copy" only ever means damaged or missing copies.

    Raises:
        IntegrityError: size or checksum differs. StorageError: the object cannot be read.
        UnusableCopyError: ``consume``'s reason, when the stored bytes are intact.
        ConexaError: ``consume``'s other errors.
    """
    where = f"target {copy.target.name!r}: {backup_id}/{artifact.name}"
    with copy.target.open(f"{backup_id}/{artifact.name}") as raw:
        reader = HashingReader(raw)
        try:
            result = consume(reader)  # type: ignore[arg-type]
        except IntegrityError as exc:  # damaged compressed data, or a key that does not fit
            if not _intact(reader, artifact):
                raise IntegrityError(f"{where}: {exc}") from None
            raise UnusableCopyError(f"{where} ({INTACT}): {exc}") from None
        except (StorageError, LocalWriteError):
            raise
        except UnsafeArchiveError as exc:
            reader.check(artifact.size, artifact.sha256, where)  # a damaged copy says so
            raise UnusableCopyError(f"{where} ({INTACT}): {exc}") from None
        except ConexaError:
            reader.check(artifact.size, artifact.sha256, where)
            raise
        reader.check(artifact.size, artifact.sha256, where)
    return result


@dataclass
class Keys:
    """What reading plaintext needs: a private scratch folder and (lazily) age identities."""

    staging: Path
    identities: Callable[[], list[Any]]


def read_plain(copy: Copy, backup_id: str, artifact: Artifact,
               consume: Callable[[IO[bytes]], T], keys: Keys) -> T:
    """Run ``consume`` on the artifact's decrypted, decompressed bytes; check the stored ones.

    Unencrypted artifacts stream straight through (``consume``'s output is provisional until
    the size and SHA-256 check that follows). Encrypted ones are first verified and decrypted
    into a private temporary file, used only once decryption authenticated every byte.

    Raises:
        IntegrityError: damaged or altered data. StorageError: unreadable.
        UnusableCopyError: intact, but undecryptable here or holding an unsafe archive member.
    """
    if artifact.encryption is None:
        return read_verified(copy, backup_id, artifact, lambda raw: consume(
            decompressing_reader(raw, artifact.compression)))
    identities = keys.identities()
    with tempfile.TemporaryFile(dir=keys.staging, prefix="decrypted-") as plain:
        read_verified(copy, backup_id, artifact,
                      lambda raw: decrypt_to(raw, plain, identities))
        plain.seek(0)
        where = f"target {copy.target.name!r}: {backup_id}/{artifact.name}"
        try:
            return consume(decompressing_reader(plain, artifact.compression))
        except IntegrityError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        except UnsafeArchiveError as exc:  # authenticated by age: intact
            raise UnusableCopyError(f"{where} ({INTACT}): {exc}") from None


def from_first_good(backup: Backup, attempt: Callable[[Copy, Manifest], T],
                    prefer: str | None = None, fallbacks: list[str] | None = None) -> T:
    """Call ``attempt`` on each complete copy until one succeeds: copies not known to be
    damaged first (a known-damaged copy is tried only when every other one failed), in
    target order otherwise.

    A damaged, missing, unreadable or unusable copy (IntegrityError, StorageError,
    UnusableCopyError) makes it try the next; any other error is the restore's own and is
    raised as it is. When a later copy succeeds, one line per copy passed over (which, why,
    and which copy was used) goes to ``fallbacks``.

    Raises:
        IntegrityError: every copy is damaged or missing ("no good copy"; why, per target).
        UnusableCopyError: no copy could be used, and some were intact (why, per target).
        StorageError: no copy could be used, and some could not be read (why, per target).
    """
    # A known-damaged copy last: trying it first costs a full download before the fallback.
    copies = sorted(backup.complete_copies, key=lambda c: c.state == "damaged")
    if prefer is not None:
        copies = [c for c in copies if c.target.name == prefer]
        if not copies:
            raise IntegrityError(f"backup {backup.id} has no complete copy on target {prefer!r}")
    problems: list[str] = []
    errors: list[Exception] = []
    for copy in copies:
        assert copy.manifest is not None
        try:
            result = attempt(copy, copy.manifest)
        except (IntegrityError, StorageError, UnusableCopyError) as exc:  # try the next one
            errors.append(exc)
            copy.seen_bad(exc)  # status, list and prune must know, not only this run's log
            where = f"target {copy.target.name!r}"
            problems.append(str(exc) if where in str(exc) else f"{where}: {exc}")
            log.warning("backup %s: copy on %r unusable: %s", backup.id, copy.target.name,
                        problems[-1])
            continue
        if fallbacks is not None:
            fallbacks += [f"backup {backup.id}: used the copy on {copy.target.name!r} because "
                          f"{problem}" for problem in problems]
        return result
    if all(proves_damage(e) for e in errors):
        raise IntegrityError(f"backup {backup.id}: no good copy: " + "; ".join(problems))
    if not any(isinstance(e, UnusableCopyError) for e in errors):  # a network error, a 503...
        raise StorageError(", ".join(c.target.name for c in copies),
                           f"backup {backup.id}: no copy could be read: " + "; ".join(problems))
    raise UnusableCopyError(f"backup {backup.id}: cannot be restored from any copy: "
                            + "; ".join(problems))


def save_verified(copy: Copy, backup_id: str, artifact: Artifact, dest: Path) -> None:
    """Copy one artifact as stored to ``dest`` (0600), checked; nothing left on failure."""
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with local_writes(dest.parent):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                read_verified(copy, backup_id, artifact, lambda raw: copy_stream(raw, out))
            tmp.replace(dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def local_writes(where: Path) -> Iterator[None]:
    """Errors writing on this host (a full disk, a permission) are not the copy's fault:
    say where, and do not try the next copy."""
    try:
        yield
    except (ConexaError, KeyboardInterrupt):
        raise
    except OSError as exc:
        raise LocalWriteError(f"cannot write under {where}: {exc.strerror or exc}") from None


class LocalWriteError(ConexaError):
    """Writing restored or downloaded data on this host failed."""
