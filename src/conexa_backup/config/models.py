"""The configuration models: what ``backup.toml`` may say, validated and frozen."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from conexa_backup.config.server import ServerConfig
from conexa_backup.durations import parse_duration
from conexa_backup.notify.base import NotifierConfig
from conexa_backup.notify.registry import REGISTRY as NOTIFIERS
from conexa_backup.retention import RetentionConfig
from conexa_backup.storage.base import TargetConfig
from conexa_backup.storage.registry import REGISTRY as TARGETS


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseConfig(_Model):
    """``[database]``: the PostgreSQL database to protect."""

    url: str = Field(min_length=1)
    password_file: Path | None = None
    jobs: int = Field(default=2, ge=1, le=64)  # pg_restore -j
    # pg_dump -j: above 1, a directory-format dump by N workers, spooled to state_dir/staging
    # (needs room for the uncompressed dump), then archived, compressed and stored.
    dump_jobs: int = Field(default=1, ge=1, le=64)
    globals: bool = False
    maintenance_database: str = "postgres"
    bin_dir: Path | None = None
    # How long pg_dump waits for a table lock (pg_dump --lock-wait-timeout) before it fails,
    # naming the session that holds the lock; without it a migration's ACCESS EXCLUSIVE lock
    # would hold the backup for as long as the migration runs.
    lock_wait_timeout: str = "10m"

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("lock_wait_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class UploadsConfig(_Model):
    """``[uploads]``: the folder of user files."""

    path: Path
    # A backup whose file count or bytes fell by more than this share since the previous
    # complete backup (an unmounted volume, a wrong path) is stored with a warning (exit 3).
    max_shrink: float = Field(default=0.5, ge=0, le=1)
    # "packs": each backup stores only the files no earlier backup on a target holds, as
    # deduplicated blobs in packs (docs/packs.md); "tar": the whole folder, one tar a backup.
    # Left out of the file: packs, except where packs cannot go (Config._default_format).
    format: Literal["packs", "tar"] = "packs"
    # Cached files read again anyway on each run (packs): a stale cache is found within
    # ceil(1 / rehash_share) runs (docs/packs.md, "File cache"); `backup --rehash` reads all.
    rehash_share: float = Field(default=0.01, ge=0, le=1)
    # Prune's garbage collection of packs (docs/packs.md, "Garbage collection"): a pack no
    # remaining backup references is deleted once older than gc_grace (a running backup's
    # packs are referenced only when it ends); one whose unreferenced share of content
    # exceeds repack_threshold (and older than gc_grace) is rewritten without that share.
    gc_grace: str = "24h"
    repack_threshold: float = Field(default=0.3, gt=0, le=1)

    @field_validator("gc_grace")
    @classmethod
    def _grace(cls, value: str) -> str:
        parse_duration(value)
        return value


class CompressionConfig(_Model):
    """``[compression]``: zstd (default, multi-threaded) or gzip."""

    algorithm: Literal["zstd", "gzip"] = "zstd"
    level: int | None = Field(default=None, ge=1, le=19)
    threads: int = Field(default=0, ge=0, le=256)


class DrillConfig(_Model):
    """``[drill]``: how ``verify --drill`` proves a backup restores."""

    # Restore on another server (recommended); default: the configured database's server.
    database_url: str | None = None
    password_file: Path | None = None
    # SQL queries run in the restored database; each must return one true value.
    checks: list[str] = Field(default_factory=list)
    rto_objective: str = "1h"
    # Hash at most this many uploads files (a random sample) instead of all of them.
    uploads_sample: int | None = Field(default=None, ge=1)

    @field_validator("rto_objective")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _url_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value


class EncryptionConfig(_Model):
    """``[encryption]``: age encryption at rest, off unless recipients are set."""

    recipients: list[str] = Field(default_factory=list)  # age1... public keys
    # Where restores and drills happen (never needed on the backup host):
    identity_file: Path | None = None
    identity: SecretStr | None = None  # e.g. "${AGE_IDENTITY}"
    # Packs format with recipients: blob ids are HMAC-SHA-256 under this key (64 hex digits,
    # so ids reveal nothing); needed where backups are made,
    # restored and drilled (docs/security.md). Make one: `openssl rand -hex 32 > FILE`.
    dedup_key_file: Path | None = None


class SigningConfig(_Model):
    """``[signing]``: Ed25519 manifest signatures (PEM keys, e.g. made with openssl)."""

    key_file: Path | None = None  # private key, on the backup host: sign every manifest
    # Where backups are read: refuse unsigned or altered ones, and those signed by any other
    # key. One key, or several (after a rotation: the old and the new one).
    public_key_file: Path | None = None
    public_key_files: list[Path] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> SigningConfig:
        if self.public_key_file is not None and self.public_key_files is not None:
            raise PydanticCustomError("signing", "set public_key_file or public_key_files, "
                                      "not both (list every trusted key in public_key_files)")
        return self

    @property
    def trusted_key_files(self) -> tuple[str, list[Path]]:
        """The setting that names the trusted public keys, and their files (none: no
        signature is required)."""
        if self.public_key_files is not None:
            return "signing.public_key_files", list(self.public_key_files)
        return "signing.public_key_file", [p for p in (self.public_key_file,) if p is not None]


class MonitoringConfig(_Model):
    """``[monitoring]``: what ``status`` calls fresh, and the Prometheus textfile."""

    max_backup_age: str = "26h"  # RPO of one day, plus slack
    max_drill_age: str = "8d"  # a weekly drill, plus slack
    metrics_file: Path | None = None
    currency: str = "R$"  # for price_per_gb_month in `report`

    @field_validator("max_backup_age", "max_drill_age")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


if TYPE_CHECKING:
    AnyTargetConfig = TargetConfig
    AnyNotifierConfig = NotifierConfig
else:
    # Discriminated unions over every registered type, so that an error points at the
    # fields of the type the user chose (``targets.0.path``), not at every type's.
    AnyTargetConfig = TARGETS.union()
    AnyNotifierConfig = NOTIFIERS.union()


class Config(_Model):
    """The whole file."""

    state_dir: Path = Path("/var/lib/conexa-backup")
    database: DatabaseConfig
    uploads: UploadsConfig | None = None
    compression: CompressionConfig = CompressionConfig()
    retention: RetentionConfig = RetentionConfig()
    drill: DrillConfig = DrillConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    signing: SigningConfig = SigningConfig()
    targets: list[AnyTargetConfig] = Field(min_length=1)
    notify: list[AnyNotifierConfig] = Field(default_factory=list)
    # `conexa-backup serve` (the HTTP API); absent: serve refuses to start.
    server: ServerConfig | None = None

    def retention_for(self, target: str) -> RetentionConfig:
        """The target's own retention table, else the top-level one."""
        for t in self.targets:
            if t.name == target and t.retention is not None:
                return t.retention
        return self.retention

    @model_validator(mode="before")
    @classmethod
    def _default_format(cls, data: Any) -> Any:
        """``[uploads] format`` left out of the file: packs, the default, except where the
        config cannot hold packs (encryption without ``dedup_key_file``, a target with
        Object Lock): tar there, as before, so that an upgrade never turns a config that
        worked into one refused at load. ``check`` says which format is in use, and why."""
        if not isinstance(data, dict) or not isinstance(data.get("uploads"), dict) \
                or "format" in data["uploads"]:
            return data
        enc = data.get("encryption")
        enc = enc if isinstance(enc, dict) else {}
        keyless = bool(enc.get("recipients")) and not enc.get("dedup_key_file")
        targets = data.get("targets")
        locked = isinstance(targets, list) and any(
            isinstance(t, dict) and t.get("object_lock_mode") for t in targets)
        chosen = "tar" if keyless or locked else "packs"
        return {**data, "uploads": {**data["uploads"], "format": chosen}}

    @model_validator(mode="after")
    def _packs_fit(self) -> Config:
        """What the packs format needs: a dedup key with encryption, and no Object Lock (a
        pack's lock would have to outlast every later backup that reuses its blobs)."""
        if self.uploads is None or self.uploads.format != "packs":
            return self
        if self.encryption.recipients and self.encryption.dedup_key_file is None:
            raise ValueError("uploads.format = \"packs\" with [encryption] recipients needs "
                             "encryption.dedup_key_file (make one with `openssl rand -hex 32 "
                             "> FILE; chmod 600 FILE`): unkeyed blob ids would tell storage "
                             "which known files the school holds")
        locked = [t.name for t in self.targets if getattr(t, "object_lock_mode", None)]
        if locked:
            raise ValueError(f"uploads.format = \"packs\" cannot be used with Object Lock "
                             f"(target {locked[0]!r}): a pack is reused by every later backup, "
                             "so no lock date set when it is written covers them; use "
                             "format = \"tar\" on a locked bucket")
        return self

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, value: list[TargetConfig]) -> list[TargetConfig]:
        names = [t.name for t in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dupes)}")
        return value
