"""The configuration in effect, as TOML a sysadmin can read (``conexa-backup config show``).

Defaults filled in, ``${VAR}``s and the seed's environment variables applied, every secret
shown as ``********``, and where each value came from as a comment: the file, the
environment, or the default.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from conexa_backup.config.loading import _apply_seed_env, _expand, parse_config, read_text

HIDDEN = "********"
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]+@")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

Path_ = tuple[str | int, ...]


def effective(src: Path, env: Mapping[str, str] | None = None) -> tuple[dict[str, Any],
                                                                       Callable[[Path_], str]]:
    """The validated configuration of file ``src`` as plain data (secrets hidden), and a
    function telling where the value at a key path came from.

    Raises:
        ConfigError: the file cannot be read or is not a valid configuration.
    """
    env = os.environ if env is None else env
    text = read_text(src)
    config = parse_config(text, src, env)
    raw = tomllib.loads(text)
    expanded = _expand(copy.deepcopy(raw), (), env, src)
    seeded = copy.deepcopy(expanded)
    _apply_seed_env(seeded, env)
    doc = _hide(config.model_dump(mode="json", exclude_none=True))

    def origin(path: Path_) -> str:
        before, after = _get(expanded, path), _get(seeded, path)
        # The seed's variables may add an empty list to fill later: that is no value of theirs.
        if after != before and not (before is _MISSING and after in ([], {})):
            return "from the environment (a seed variable: see `check`)"
        written = _get(raw, path)
        if written is _MISSING:
            return "default"
        if isinstance(written, str) and "${" in written:
            return "from the file, with its ${VAR}s from the environment"
        return "from the file"
    return doc, origin


_MISSING = object()


def _get(data: Any, path: Path_) -> Any:
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return _MISSING
        elif not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _hide(value: Any) -> Any:
    """Secrets as ``********``: pydantic's masked SecretStr values, and URL passwords."""
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide(v) for v in value]
    if isinstance(value, str):
        if value and set(value) == {"*"}:
            return HIDDEN
        return _URL_PASSWORD.sub(rf"\g<1>{HIDDEN}@", value)
    return value


def to_toml(doc: dict[str, Any], origin: Callable[[Path_], str]) -> str:
    """``doc`` as TOML, each value followed by a comment saying ``origin`` of its key path."""
    lines: list[str] = []
    _table(doc, (), lines, origin)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table(value: Any) -> bool:
    return isinstance(value, dict)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(part: str) -> str:
    return part if _BARE_KEY.match(part) else tomli_w.dumps({"k": part})[4:].strip()


def _table(table: dict[str, Any], path: Path_, lines: list[str],
           origin: Callable[[Path_], str]) -> None:
    for key, value in table.items():
        if not _is_table(value) and not _is_table_array(value):
            text = tomli_w.dumps({key: value}).rstrip("\n")
            lines.append(f"{text}  # {origin((*path, key))}")
    header = ".".join(_key(p) for p in path if isinstance(p, str))
    for key, value in table.items():
        name = f"{header}.{_key(key)}" if header else _key(key)
        if _is_table(value):
            lines += ["", f"[{name}]"]
            _table(value, (*path, key), lines, origin)
        elif _is_table_array(value):
            for i, item in enumerate(value):
                lines += ["", f"[[{name}]]"]
                _table(item, (*path, key, i), lines, origin)
