"""The per-backup manifest: written last, it is the commit marker of a backup copy.

A backup folder (``<id>/``) on a target without ``manifest.json`` is incomplete: never listed
as good, never restored, never counted. The manifest says everything needed to restore and to
prove a restore complete: checksums and sizes of every artifact, versions, per-table row counts
taken in the dump's own snapshot, and what the uploads tree held.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conexa_backup.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Python callers use fullmatch: "$" alone would let a trailing newline through.
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z(?:-\d{1,3})?$")
ID_FORMAT = "%Y%m%dT%H%M%SZ"
# Names of the objects conexa-backup writes in a backup's folder: the only ones it deletes.
OWNED_NAME = re.compile(r"^(?:manifest\.json|manifest\.json\.sig|drill\.json"
                        r"|(?:database\.dump|database\.dir\.tar|globals\.sql|uploads\.tar"
                        r"|uploads\.index\.jsonl)"
                        r"\.(?:zst|gz)(?:\.age)?)$")


class _Model(BaseModel):
    # Unknown keys are kept (extra="allow") so that an older tool can still read a newer
    # manifest's essentials; FORMAT_VERSION guards incompatible changes.
    model_config = ConfigDict(extra="allow", frozen=True)


class Artifact(_Model):
    """One stored file of a backup."""

    name: str = Field(pattern=OWNED_NAME.pattern)  # never a path: only names we write
    kind: Literal["database", "globals", "uploads", "uploads-index"]
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    compression: Literal["zstd", "gzip"]
    content: str  # "pg_dump-custom", "pg_dump-directory" (a tar of it), "sql", "tar", "jsonl"
    encryption: Literal["age"] | None = None
    recipients: list[str] = Field(default_factory=list)  # fingerprints of the age recipients


class DatabaseInfo(_Model):
    name: str
    server_version: str
    pg_dump_version: str
    encoding: str
    collate: str
    ctype: str
    owner: str
    locale_provider: str = "c"
    icu_locale: str | None = None
    tables: dict[str, int]  # "schema.table" -> rows, in the dump's snapshot
    # kind ("tables", "sequences", "views", "functions", "extensions") -> sorted names
    objects: dict[str, list[str]] = Field(default_factory=dict)


class SkippedPath(_Model):
    path: str  # relative to the uploads folder
    reason: str  # "cannot read: Permission denied", "a FIFO: cannot be restored"...


class UploadsInfo(_Model):
    path: str
    files: int
    bytes: int
    dirs: int
    symlinks: int
    # Entries not backed up (unreadable, or kinds a restore cannot recreate): all counted,
    # the first ones named (the manifest stays small on a huge tree).
    skipped: int = 0
    skipped_paths: list[SkippedPath] = Field(default_factory=list)
    # Why this tree looked wrong (empty, or shrunken since the last trusted backup): such a
    # backup is never the one the next backup's tree is compared with.
    suspect: str | None = None
    # An "uploads-index" artifact lists every file (path, size, SHA-256) and symlink (path,
    # target) as JSON lines: see IndexEntry.
    # "tar": the files are in the "uploads" artifact. "packs": they are blobs in the target's
    # packs (docs/packs.md); the index also holds folders, modes, owners, mtimes and each
    # file's blob ids, named as ``ids`` says (``key_id``: the dedup key's, when keyed).
    format: Literal["tar", "packs"] = "tar"
    ids: Literal["sha256", "hmac-sha256"] | None = None
    key_id: str | None = None
    # "chunks" (packs only): the index itself is stored in the target's packs, in pieces
    # named like blobs, and the "uploads-index" artifact lists them (actions/uploads_index).
    # "lines": the artifact is the index.
    index: Literal["lines", "chunks"] = "lines"


class Attrs(TypedDict, total=False):
    """An entry's attributes in a packs backup's index (:class:`IndexEntry`)."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int


@dataclass(frozen=True)
class IndexEntry:
    """One line of the uploads index: a regular file or a symlink, as stored; in a packs
    backup also every folder (``"."``: the uploads folder itself) and each entry's mode
    (``st_mode & 0o7777``), owner, mtime, and each file's blob ids in order."""

    path: str
    type: Literal["file", "symlink", "dir"]
    size: int | None = None  # files
    sha256: str | None = None  # files
    target: str | None = None  # symlinks: the link's text, exactly as stored
    mode: int | None = None  # packs backups only, from here on
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    blobs: tuple[str, ...] | None = None  # files

    def to_line(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies every value, a third of an unchanged
        # packs backup's time per file (measured).
        size, mode, uid, gid, mtime = self.size, self.mode, self.uid, self.gid, self.mtime_ns
        if self.type == "file" and self.blobs is not None and size is not None \
                and mode is not None and uid is not None and gid is not None \
                and mtime is not None and self.sha256 is not None \
                and _IDS.fullmatch(",".join((self.sha256, *self.blobs))):
            return file_line(self.path, size, self.sha256, mode, uid, gid, mtime, self.blobs)
        if self.type == "dir" and mode is not None and uid is not None and gid is not None \
                and mtime is not None:
            return dir_line(self.path, mode, uid, gid, mtime)
        data = {k: list(v) if isinstance(v, tuple) else v
                for k in _INDEX_FIELDS if (v := getattr(self, k)) is not None}
        # ASCII escapes: a name that is not UTF-8 (held as surrogate escapes, see os.fsdecode)
        # is written as "\\udce9" and read back as the same str, which os functions accept.
        return json.dumps(data).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> IndexEntry:
        """Parse one line; lines without ``type`` (indexes written before links were
        recorded) are files.

        Raises:
            IntegrityError: not an index line.
        """
        try:
            raw = json.loads(line)
            kind = raw.get("type", "file")
            attrs = Attrs()
            for name in ("mode", "uid", "gid", "mtime_ns"):
                if name in raw:
                    attrs[name] = int(raw[name])
            if kind == "symlink":
                return cls(str(raw["path"]), "symlink", target=str(raw["target"]), **attrs)
            if kind == "dir":
                return cls(str(raw["path"]), "dir", **attrs)
            if kind != "file":
                raise ValueError(f"unknown type {kind!r}")
            blobs = raw.get("blobs")
            if blobs is not None and not (isinstance(blobs, list)
                                          and all(isinstance(b, str) for b in blobs)):
                raise ValueError("blobs is not a list of ids")
            return cls(str(raw["path"]), "file", int(raw["size"]), str(raw["sha256"]),
                       blobs=None if blobs is None else tuple(blobs), **attrs)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"uploads index: unreadable line ({exc})") from None


_INDEX_FIELDS = tuple(f.name for f in fields(IndexEntry))


def file_line(path: str, size: int, sha256: str, mode: int, uid: int, gid: int,
              mtime_ns: int, blobs: Sequence[str]) -> bytes:
    """A packs index line for a file, formatted directly: the same JSON as
    :meth:`IndexEntry.to_line`, without building the entry (json.dumps of a dict took half
    of an unchanged backup's time per file: measured). ``sha256`` and ``blobs`` must be
    lowercase hex ids (nothing in them is escaped)."""
    ids = ", ".join(f'"{b}"' for b in blobs)
    return (f'{{"path": {json.dumps(path)}, "type": "file", "size": {size}, '
            f'"sha256": "{sha256}", "mode": {mode}, "uid": {uid}, "gid": {gid}, '
            f'"mtime_ns": {mtime_ns}, "blobs": [{ids}]}}\n').encode()


def dir_line(path: str, mode: int, uid: int, gid: int, mtime_ns: int) -> bytes:
    """A packs index line for a folder, formatted directly (see :func:`file_line`)."""
    return (f'{{"path": {json.dumps(path)}, "type": "dir", "mode": {mode}, "uid": {uid}, '
            f'"gid": {gid}, "mtime_ns": {mtime_ns}}}\n').encode()


_IDS = re.compile(r"[0-9a-f]{64}(?:,[0-9a-f]{64})*")  # ids only: nothing to escape


class Manifest(_Model):
    format: int = FORMAT_VERSION
    id: str = Field(pattern=ID_PATTERN.pattern)
    kind: Literal["scheduled", "safety"] = "scheduled"
    tool_version: str
    hostname: str
    started_at: datetime
    finished_at: datetime
    database: DatabaseInfo | None = None
    uploads: UploadsInfo | None = None
    artifacts: list[Artifact]
    # What the backup could not take or found suspicious (unreadable files, a shrunken uploads
    # folder...): a backup with warnings is complete but the run is partial (exit 3).
    warnings: list[str] = Field(default_factory=list)
    # The id of the key that signs it (crypto.key_id), when [signing] has a key: covered by
    # the signature, and what tells a key not trusted here from an alteration. Not written
    # when None (older tools keep unknown keys: extra="allow").
    signed_by: str | None = None

    @property
    def size_bytes(self) -> int:
        return sum(a.size for a in self.artifacts)

    def artifact(self, kind: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.kind == kind), None)

    def to_json(self) -> bytes:
        unset = {"signed_by"} if self.signed_by is None else None
        return (self.model_dump_json(indent=2, exclude=unset) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate; raise IntegrityError naming ``where`` when it is unusable."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
                raise IntegrityError(f"{where}: unsupported manifest format")
            return cls.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise IntegrityError(f"{where}: invalid manifest ({first})") from None


def shown_path(path: str) -> str:
    """``path`` as printable text (for the manifest, messages and JSON): the bytes of a name
    that is not UTF-8 as ``\\xe9`` escapes. Not for opening: the index keeps the real name."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def new_backup_id(now: datetime, taken: set[str]) -> str:
    """A UTC timestamp id (``20261130T021500Z``), suffixed ``-N`` if that second is taken."""
    base = now.astimezone(UTC).strftime(ID_FORMAT)
    if base not in taken:
        return base
    n = 1
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


def id_sort_key(backup_id: str) -> tuple[str, int]:
    """Chronological order of ids (``-10`` after ``-9``)."""
    base, _, n = backup_id.partition("-")
    return base, int(n) if n else 0
