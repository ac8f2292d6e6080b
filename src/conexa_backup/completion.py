"""Shell completion of backup ids and target names (``conexa-backup --install-completion``).

Completing must be instant and must never reach a target: ids come from the manifest cache in
``state_dir/cache`` (every backup any command has listed on this host), target names from the
config file. Anything that goes wrong completes nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from conexa_backup.errors import ConexaError


def _config(ctx: Any) -> Any:
    """The config the command line names (``--config`` before or after the command), else
    the default search; None when there is none or it is invalid."""
    from conexa_backup.config import load_config

    explicit = None
    node = ctx
    while node is not None:
        value = node.params.get("config") if getattr(node, "params", None) else None
        explicit = explicit or value
        node = node.parent
    with contextlib.suppress(ConexaError, OSError):
        return load_config(Path(explicit) if explicit else None)[0]
    return None


def backup_ids(ctx: Any, incomplete: str) -> list[str]:
    """``latest`` and the ids in the manifest cache, newest first, that start with
    ``incomplete``."""
    config = _config(ctx)
    ids: set[str] = set()
    if config is not None:
        with contextlib.suppress(OSError):
            for entry in (Path(config.state_dir) / "cache").glob("*/*.entry.json"):
                ids.add(entry.name.removesuffix(".entry.json"))
    found = ["latest", *sorted(ids, reverse=True)]
    return [i for i in found if i.startswith(incomplete)]


def target_names(ctx: Any, incomplete: str) -> list[str]:
    """The configured targets' names that start with ``incomplete``."""
    config = _config(ctx)
    names = [t.name for t in config.targets] if config is not None else []
    return [n for n in names if n.startswith(incomplete)]
