"""Finding, parsing and validating ``backup.toml``.

Errors name the file, the key path and the problem, with a line number where one can be
found, and never echo a value (values may be secrets).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conexa_backup.config.models import Config
from conexa_backup.errors import ConfigError
from conexa_backup.storage.registry import target_types

ENV_CONFIG = "CONEXA_BACKUP_CONFIG"
SYSTEM_CONFIG = Path("/etc/conexa-backup/backup.toml")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def find_config(explicit: Path | None, env: Mapping[str, str] | None = None) -> Path:
    """``--config``, else ``$CONEXA_BACKUP_CONFIG``, else ``./backup.toml``, else ``/etc/...``.

    Raises:
        ConfigError: the chosen file does not exist, or none of the defaults does.
    """
    env = os.environ if env is None else env
    chosen = explicit or (Path(env[ENV_CONFIG]) if env.get(ENV_CONFIG) else None)
    if chosen is not None:
        if not chosen.is_file():
            raise ConfigError(f"{chosen}: config file not found")
        return chosen
    for candidate in (Path("backup.toml"), SYSTEM_CONFIG):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no config file: pass --config, set ${ENV_CONFIG}, or create ./backup.toml "
        f"or {SYSTEM_CONFIG}",
        hint="`conexa-backup init` writes a starter file",
    )


def _expand(value: Any, path: tuple[str | int, ...], env: Mapping[str, str], src: Path) -> Any:
    """Replace ``${VAR}`` in every string value from ``env``."""
    if isinstance(value, str):
        if "\0" in value:
            raise ConfigError(f"{src}: {_dotted(path)}: contains a NUL character")

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(
                    f"{src}: {_dotted(path)}: environment variable ${{{name}}} is not set"
                )
            return env[name]

        return _VAR.sub(repl, value)
    if isinstance(value, dict):
        return {k: _expand(v, (*path, k), env, src) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, src) for i, v in enumerate(value)]
    return value


def _dotted(path: tuple[str | int, ...]) -> str:
    """``a.b.0.c``; a key with spaces, quotes or control characters is quoted, so an error
    stays one line and prints no control codes."""
    def part(p: str | int) -> str:
        text = str(p)
        return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else json.dumps(text)
    return ".".join(part(p) for p in path) or "(top level)"


def _apply_seed_env(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Honour the seed deployment's ``.env`` variables that map onto this file; return one
    note per variable that changed something (for ``check``; never a value that may be secret).

    ``DATABASE_URL`` overrides ``[database].url``; ``BACKUP_RETENTION_DAYS=N`` sets the default
    ``[retention] keep_within = "Nd"``. As in the seed (a cloud copy is enabled by
    its bucket variable), ``AWS_S3_BUCKET`` / ``GCS_BUCKET`` add an ``s3`` / ``gcs`` target
    when none of that type is configured; the targets read the seed's other variables
    (``AWS_REGION``, ``GCS_PROJECT_ID``, ``GCS_KEY_FILE``; AWS keys via the standard chain).
    """
    notes: list[str] = []
    if env.get("DATABASE_URL"):
        db = data.setdefault("database", {})
        if isinstance(db, dict):
            verb = "overrides" if "url" in db else "sets"
            db["url"] = env["DATABASE_URL"]
            notes.append(f"DATABASE_URL {verb} [database] url")
    days = env.get("BACKUP_RETENTION_DAYS", "").strip()
    if days:
        retention = data.setdefault("retention", {})
        if isinstance(retention, dict):
            verb = "overrides" if "keep_within" in retention else "sets"
            retention["keep_within"] = f"{days}d"
            notes.append(f'BACKUP_RETENTION_DAYS {verb} [retention] keep_within = "{days}d"')
    notes += _seed_notifiers(data, env)
    targets = data.get("targets")
    if not isinstance(targets, list):
        return notes
    types = {t.get("type") for t in targets if isinstance(t, dict)
             and isinstance(t.get("type"), str)}
    names = {t.get("name") for t in targets if isinstance(t, dict)
             and isinstance(t.get("name"), str)}
    for var, kind in (("AWS_S3_BUCKET", "s3"), ("GCS_BUCKET", "gcs")):
        if env.get(var) and kind not in types and kind not in names:
            targets.append({"name": kind, "type": kind, "bucket": env[var]})
            notes.append(f"{var} adds target {kind!r} (bucket {env[var]})")
    return notes


def _seed_notifiers(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """``SLACK_WEBHOOK_URL`` and ``BACKUP_NOTIFY_EMAIL`` (with ``SMTP_*``) add notifiers."""
    notify = data.setdefault("notify", [])
    if not isinstance(notify, list):
        return []
    notes = []
    types = {n.get("type") for n in notify if isinstance(n, dict)
             and isinstance(n.get("type"), str)}
    if env.get("SLACK_WEBHOOK_URL") and "slack" not in types:
        notify.append({"type": "slack", "webhook_url": env["SLACK_WEBHOOK_URL"]})
        notes.append("SLACK_WEBHOOK_URL adds a slack notifier")
    if env.get("BACKUP_NOTIFY_EMAIL") and "email" not in types:
        email: dict[str, Any] = {
            "type": "email",
            "to": [a.strip() for a in env["BACKUP_NOTIFY_EMAIL"].split(",") if a.strip()]}
        for var, key in (("SMTP_HOST", "host"), ("SMTP_USER", "username"),
                         ("SMTP_PASSWORD", "password"), ("SMTP_FROM", "from"),
                         ("SMTP_SECURITY", "security")):
            if env.get(var):
                email[key] = env[var]
        if env.get("SMTP_PORT", "").isdigit():
            email["port"] = int(env["SMTP_PORT"])
        notify.append(email)
        notes.append("BACKUP_NOTIFY_EMAIL adds an email notifier")
    return notes


def seed_env_notes(src: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """What the seed's environment variables change in the file ``src`` (see
    :func:`_apply_seed_env`); empty when the file cannot be read or parsed (loading it
    reports that)."""
    env = os.environ if env is None else env
    try:
        data = _expand(tomllib.loads(src.read_text(encoding="utf-8")), (), env, src)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError, ConfigError):
        return []
    return _apply_seed_env(data, env) if isinstance(data, dict) else []


def find_line(text: str, loc: tuple[str | int, ...]) -> int | None:
    """Best-effort line (1-based) where the key at ``loc`` is written in ``text``."""
    lines = text.splitlines()
    start = 0
    table: list[str] = []
    for part in loc:
        if isinstance(part, int):
            header = re.compile(r"^\s*\[\[\s*" + re.escape(".".join(table)) + r"\s*\]\]")
            hits = [i for i, line in enumerate(lines) if header.match(line)]
            if part >= len(hits):
                return None
            start = hits[part] + 1
            continue
        key = re.compile(r"^\s*" + re.escape(part) + r"\s*=")
        for i in range(start, len(lines)):
            if key.match(lines[i]):
                return i + 1
            if lines[i].lstrip().startswith("["):
                break
        header = re.compile(r"^\s*\[\s*" + re.escape(".".join([*table, part])) + r"\s*\]")
        hits = [i for i, line in enumerate(lines) if header.match(line)]
        table.append(part)
        if hits:
            start = hits[0] + 1
        elif not any(
            re.match(r"^\s*\[\[\s*" + re.escape(".".join(table)) + r"\s*\]\]", line)
            for line in lines
        ):
            return None
    return start if start else None


def _format_validation(exc: ValidationError, src: Path, text: str) -> str:
    problems = []
    known = target_types()
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function")))
        if len(loc) >= 3 and loc[0] == "targets" and loc[2] in known:
            loc = loc[:2] + loc[3:]  # drop the union's tag: the user wrote targets.N.key
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] in ("missing", "union_tag_not_found"):
            msg = "required key is missing"
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*loc, "type")
        if loc[:1] == ("targets",) and loc[-1:] == ("type",) and msg != "required key is missing":
            msg = f"unknown target type; known types: {', '.join(sorted(known))}"
        where = _dotted(loc)
        line = find_line(text, loc)
        at = f" (line {line})" if line else ""
        problems.append(f"{where}{at}: {msg}")
    return f"{src}: " + "; ".join(problems)


def parse_config(text: str, src: Path, env: Mapping[str, str] | None = None) -> Config:
    """Parse TOML ``text`` (read from ``src``) into a validated :class:`Config`.

    Raises:
        ConfigError: malformed TOML (with its line), an unset ``${VAR}``, or invalid values.
    """
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{src}: invalid TOML: nested too deeply") from None
    data = _expand(raw, (), env, src)
    _apply_seed_env(data, env)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, src, text)) from None


def load_config(explicit: Path | None = None) -> tuple[Config, Path]:
    """Find and load the config file; see :func:`find_config` and :func:`parse_config`."""
    src = find_config(explicit)
    return parse_config(read_text(src), src), src


def read_text(src: Path) -> str:
    """The config file's text.

    Raises:
        ConfigError: it cannot be read, or is not UTF-8.
    """
    try:
        return src.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read config file: {exc}") from None


_SECRET_KEYS = {"password", "secret", "secret_access_key", "webhook_url", "identity", "url",
                "headers"}
_URL_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]+@")
_ONLY_VARS = re.compile(r"^(?:\$\{[A-Za-z_][A-Za-z0-9_]*\}\s*)+$")


def secrets_written_in(text: str) -> list[str]:
    """Key paths of secrets written literally in the file (not ``${VAR}`` references)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    found: list[str] = []

    def walk(value: Any, path: tuple[str | int, ...]) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, (*path, k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, (*path, i))
        elif isinstance(value, str) and value and not _ONLY_VARS.match(value):
            keys = {p for p in path if isinstance(p, str)}
            if (path and path[-1] == "url" and not _URL_PASSWORD.search(_VAR.sub("", value))
                    and "notify" not in keys):
                return  # an ordinary URL without a password (a notifier's URL is a secret)
            if keys & _SECRET_KEYS:
                found.append(_dotted(path))

    walk(raw, ())
    return found


def permission_warning(path: Path, text: str) -> str | None:
    """A warning when a file holding literal secrets is readable by other users."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if not mode & 0o077:
        return None
    secrets = secrets_written_in(text)
    if not secrets:
        return None
    return (f"{path} is readable by other users and holds secrets ({', '.join(secrets)}): "
            f"chmod 600 {path}, or move them to ${{VAR}}s or *_file keys")
