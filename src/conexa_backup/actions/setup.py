"""``init`` (write a starter config) and ``check`` (test every connection, back up nothing)."""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conexa_backup import archive, postgres
from conexa_backup.actions.context import Context
from conexa_backup.config.loading import seed_env_notes
from conexa_backup.crypto import load_dedup_key
from conexa_backup.errors import ConexaError, StorageError, UsageError
from conexa_backup.storage import s3_versions
from conexa_backup.storage.base import Target
from conexa_backup.storage.s3 import S3Target


def starter_config() -> str:
    """The commented starter file (the same text as ``backup.toml.example``)."""
    return (importlib.resources.files("conexa_backup") / "templates" / "backup.toml").read_text(
        encoding="utf-8")


def init(path: Path, *, force: bool = False) -> Path:
    """Write the starter config to ``path`` (0600). Refuses to overwrite unless ``force``.

    Raises:
        UsageError: the file exists. ConexaError: it cannot be written.
    """
    if path.exists() and not force:
        raise UsageError(f"{path} already exists (use --force to overwrite)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(starter_config())
    except OSError as exc:
        raise ConexaError(f"cannot write {path}: {exc.strerror}") from None
    return path


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    warnings: list[str] = field(default_factory=list)  # worth knowing; not failures


def _run(name: str, probe: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, probe())
    except ConexaError as exc:
        return CheckResult(name, False, str(exc))
    except OSError as exc:
        return CheckResult(name, False, f"{exc.strerror or exc}")


def _check_database(ctx: Context) -> str:
    info = ctx.db
    with info.connect() as conn:
        server = postgres.server_info(conn)
    version, major = postgres.tool_version(info, "pg_dump")
    if major < server.major:
        raise ConexaError(f"pg_dump {version} is older than the server {server.version}")
    return f"{info.describe()}: PostgreSQL {server.version}, pg_dump {version}"


def _check_tools(ctx: Context) -> str:
    found = [f"{tool} {postgres.tool_version(ctx.db, tool)[0]}"
             for tool in ("pg_restore", "pg_dumpall")]
    return ", ".join(found)


def _check_uploads(ctx: Context) -> str:
    """Every folder listed and every file opened (a sample on huge trees), as a backup would.

    Raises:
        ConexaError: the folder is missing, or a backup would skip something in it.
    """
    if ctx.config.uploads is None:
        return "no [uploads] configured: only the database is backed up"
    path = ctx.config.uploads.path
    probe = archive.probe_tree(path)  # really opens files: access() ignores ACLs, races...
    scope = (f"opened all {probe.files} files" if probe.tried == probe.files else
             f"opened a random sample of {probe.tried} of {probe.files} files")
    skipped = probe.skipped
    if skipped.count:
        named = ", ".join(f"{p} ({why})" for p, why in skipped.listed[:5])
        more = f" and {skipped.count - 5} more" if skipped.count > 5 else ""
        raise ConexaError(f"{path}: {scope}; a backup would skip {skipped.count} "
                          f"entr{'y' if skipped.count == 1 else 'ies'}: {named}{more}")
    # Followed by backups (the archive's root is the folder it points to): said, not refused.
    link = f"; a link to {path.resolve()}, followed" if path.is_symlink() else ""
    return f"{path} readable ({scope}){link}{_packs_note(ctx)}"


def _packs_note(ctx: Context) -> str:
    """What the packs format needs, checked: the dedup key loads (never shown).

    Raises:
        ConfigError: the dedup key file is unreadable or malformed.
    """
    uploads = ctx.config.uploads
    if uploads is None:
        return ""
    if uploads.format != "packs":
        enc = ctx.config.encryption
        if enc.recipients and enc.dedup_key_file is None:
            return ("; format tar (packs, the default, needs encryption.dedup_key_file with "
                    "encryption: see docs/packs.md)")
        return "; format tar"
    keyed = ctx.config.encryption.dedup_key_file is not None and \
        load_dedup_key(ctx.config.encryption.dedup_key_file) is not None
    return f"; format packs, {'keyed' if keyed else 'plain SHA-256'} blob ids"


def _check_state_dir(ctx: Context) -> str:
    path = ctx.state_dir()
    probe = path / f".probe-{secrets.token_hex(4)}"
    probe.write_bytes(b"ok")
    probe.unlink()
    return f"{path} writable"


def _check_target(target: Target, warnings: list[str]) -> str:
    """Write, read back and delete a probe object; on S3 also say (in ``warnings``) what
    would let old versions pile up, and a probe the bucket keeps anyway.

    Raises:
        ConexaError: the target refused or mangled the probe.
    """
    key = f"conexa-probe-{secrets.token_hex(6)}"
    payload = secrets.token_bytes(64)
    s3 = target if isinstance(target, S3Target) else None
    # On S3 the probe must not outlive the check: no Object Lock headers (a locked probe would
    # stay, billed, for the whole lock period), then every version removed by id (a plain
    # delete on a versioned bucket only hides it).
    upload = s3.writer(key, lock=False) if s3 is not None else target.writer(key)
    upload.write(payload)
    upload.commit()
    try:
        with target.open(key) as fh:
            if fh.read() != payload:
                raise ConexaError(f"target {target.name!r}: probe object read back differently")
    finally:
        if s3 is None:
            with contextlib.suppress(ConexaError):
                target.delete(key)
        else:
            try:
                s3_versions.purge(s3, key)
            except StorageError as exc:  # a bucket default retention: the target still works
                warnings.append(str(exc))
    if s3 is not None:
        warnings += s3_versions.lifecycle_warnings(s3)
    return f"{target.describe()}: write, read and delete work"


def check(ctx: Context) -> list[CheckResult]:
    """Test the database, client tools, uploads folder, state_dir and every target; first,
    say which environment variables replace or add to what the file says (they win, and a
    forgotten ``DATABASE_URL`` in cron's environment would otherwise go unseen)."""
    notes = seed_env_notes(ctx.config_path) if ctx.config_path is not None else []
    where = f" of {ctx.config_path}" if ctx.config_path is not None else ""
    results = [CheckResult("environment", True, f"{note}{where}") for note in notes]
    results += [
        _run("database", lambda: _check_database(ctx)),
        _run("client tools", lambda: _check_tools(ctx)),
        _run("uploads", lambda: _check_uploads(ctx)),
        _run("state_dir", lambda: _check_state_dir(ctx)),
    ]
    for target in ctx.targets():
        warnings: list[str] = []
        result = _run(f"target {target.name}",
                      lambda t=target, w=warnings: _check_target(t, w))  # type: ignore[misc]
        result.warnings = warnings
        results.append(result)
    return results


__all__ = ["CheckResult", "UsageError", "check", "init", "starter_config"]
