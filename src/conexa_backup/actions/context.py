"""What every action needs: the config, its targets, the database and a reporter.

Actions report progress through the small :class:`Reporter` protocol, so they never know
whether a terminal, cron or a test is listening.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import SecretStr

from conexa_backup.actions.fetch import Keys
from conexa_backup.catalog import Backup, ManifestCache, Use, refresh, resolve, scan
from conexa_backup.config import Config
from conexa_backup.crypto import TrustedKeys, load_identities, load_trusted_keys
from conexa_backup.errors import ConexaError, ConfigError, IntegrityError, UsageError
from conexa_backup.state import private_dir
from conexa_backup.storage.base import Target
from conexa_backup.storage.registry import create_target

if TYPE_CHECKING:  # psycopg: imported by the commands that reach the database, when they do
    from conexa_backup.postgres import ConnInfo

MIN_SECRET_LENGTH = 8


class Reporter(Protocol):
    def step(self, message: str) -> None:
        """A step of the run starts (``dumping database``...)."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more bytes went through the current step."""


class NullReporter:
    def step(self, message: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


@dataclass
class Context:
    config: Config
    config_path: Path | None = None
    reporter: Reporter = field(default_factory=NullReporter)

    @cached_property
    def all_targets(self) -> list[Target]:
        return [create_target(t) for t in self.config.targets]

    def targets(self, names: Sequence[str] | None = None) -> list[Target]:
        """The configured targets, or only those named (in config order).

        Raises:
            UsageError: a name matches no configured target.
        """
        if not names:
            return self.all_targets
        known = {t.name for t in self.all_targets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(
                f"unknown target {unknown[0]!r}; configured: {', '.join(sorted(known))}"
            )
        return [t for t in self.all_targets if t.name in names]

    @cached_property
    def db(self) -> ConnInfo:
        from conexa_backup.postgres import conninfo
        return conninfo(self.config.database)

    @cached_property
    def drill_db(self) -> ConnInfo:
        """Where drills restore: ``[drill].database_url``, else the configured server."""
        from conexa_backup.postgres import ConnInfo, parse_url
        drill = self.config.drill
        if drill.database_url is None:
            return self.db
        params = parse_url(drill.database_url, drill.password_file, "drill", need_dbname=False)
        params.setdefault("dbname", "postgres")
        return ConnInfo(params, params["dbname"], self.config.database.bin_dir,
                        self.config.database.jobs)

    def secrets(self) -> list[str]:
        """Values that must never be printed (for redacting error messages)."""
        found: list[str] = []
        for source in ("db", "drill_db"):  # each on its own: one bad URL hides no other secret
            with contextlib.suppress(ConexaError):
                info = getattr(self, source)
                found += [v for k, v in info.params.items()
                          if k in ("password", "sslpassword") and v]
        for var in ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
            if os.environ.get(var):
                found.append(os.environ[var])
        for model in [*self.config.targets, *self.config.notify]:
            # SecretStr fields: an S3 secret key, a Slack webhook URL, webhook headers...
            for value in model.__dict__.values():
                values = value.values() if isinstance(value, dict) else [value]
                found += [v.get_secret_value() for v in values
                          if isinstance(v, SecretStr) and v.get_secret_value()]
        # Redaction is a second line of defence (secrets never go into messages by
        # construction); masking very short values would mangle ordinary words instead.
        return [s for s in found if len(s) >= MIN_SECRET_LENGTH]

    def scan(self, targets: Sequence[Target], *, with_manifests: bool = True,
             unreachable: dict[str, str] | None = None, fresh: bool = False) -> list[Backup]:
        """:func:`catalog.scan` with the manifest cache in ``state_dir/cache``.

        ``fresh`` reads every manifest from its target: what restore, verify and drills
        prove must be what is stored now, not what this host saw before. Each copy carries
        what verifies, drills and restores found (``state_dir/damaged.json``).
        """
        # Manifests cached before signatures were required were never checked: separate cache.
        name = "manifests-signed" if self.config.signing.trusted_key_files[1] else "manifests"
        cache = None if fresh else ManifestCache(self.config.state_dir / "cache" / name)
        return scan(targets, with_manifests=with_manifests, unreachable=unreachable,
                    cache=cache, verifier=self.verifier, state_dir=self.config.state_dir)

    def resolve(self, ref: str, source: str | None = None,
                notes: list[str] | None = None, *, use: Use) -> Backup:
        """The complete backup ``ref`` names (an id or ``latest`` for ``use``), its manifests
        re-read from the targets; ``source``, if given, must name a configured target holding
        a copy (``latest`` is chosen among the backups with one there). Newer backups
        ``latest`` passed over are said in ``notes`` (:func:`catalog.resolve`).

        Raises:
            UsageError: unknown target, no such backup, or no complete copy (on ``source``).
            IntegrityError: every copy's manifest, or the one on ``source``, is unusable
            (refused for its signature, or invalid).
        """
        if source is not None:
            self.targets([source])  # an unknown name is a usage error
        backup = resolve(self.scan(self.targets()), ref, notes, use=use, source=source)
        refresh(backup, self.verifier)
        if not backup.complete_copies:
            raise UsageError(f"backup {backup.id} has no usable copy left: "
                             + "; ".join(c.problem for c in backup.copies if c.problem))
        if source is not None and all(c.target.name != source for c in backup.complete_copies):
            refused = [c for c in backup.copies if c.target.name == source and c.problem]
            if refused:  # its manifest is there, and unusable: damaged, not missing
                raise IntegrityError(f"backup {backup.id}: the copy on target {source!r} is "
                                     f"damaged ({refused[0].reason}): {refused[0].problem}")
            raise UsageError(f"backup {backup.id} has no complete copy on target {source!r}")
        return backup

    @cached_property
    def verifier(self) -> TrustedKeys | None:
        """The Ed25519 public keys manifests must be signed with, if ``[signing]`` has any.

        Raises:
            ConfigError: a key file unreadable, or not an Ed25519 public key.
        """
        setting, paths = self.config.signing.trusted_key_files
        return load_trusted_keys(paths, setting) if paths else None

    def keys(self) -> Keys:
        """Scratch space and age identities for reading backups (identities loaded on use)."""
        return Keys(self.state_dir("staging"), self._identities)

    def _identities(self) -> list[Any]:
        return self._loaded_identities

    @cached_property
    def _loaded_identities(self) -> list[Any]:
        """Read once per run: a restore's preflight and each artifact it decrypts ask."""
        enc = self.config.encryption
        if enc.identity is not None:
            return load_identities(enc.identity.get_secret_value(), "encryption.identity")
        if enc.identity_file is not None:
            try:
                text = enc.identity_file.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"encryption.identity_file: cannot read "
                                  f"{enc.identity_file}: {exc.strerror}") from None
            return load_identities(text, f"encryption.identity_file {enc.identity_file}")
        raise ConfigError("this backup is encrypted: set [encryption] identity_file (or "
                          "identity) where restores and drills run")

    def state_dir(self, *parts: str) -> Path:
        """``state_dir`` (or a folder below it), created private (0700).

        Raises:
            ConexaError: it cannot be created.
        """
        path = self.config.state_dir.joinpath(*parts)
        try:
            private_dir(path)
        except OSError as exc:
            raise ConexaError(f"cannot create state_dir folder {path}: {exc.strerror}") from None
        return path
