"""Target types, found by name (see :mod:`conexa_backup.plugins`).

Third parties add types through the ``conexa_backup.targets`` entry-point group.
"""

from __future__ import annotations

from conexa_backup.errors import ConfigError
from conexa_backup.plugins import PluginType, Registry
from conexa_backup.storage.base import Target, TargetConfig

ENTRY_POINT_GROUP = "conexa_backup.targets"

BUILTIN: dict[str, str] = {
    "local": "conexa_backup.storage.local",
    "s3": "conexa_backup.storage.s3",
    "gcs": "conexa_backup.storage.gcs",
}
# The SDK each built-in type needs, and the extra that installs it.
_SDK_EXTRA = {"s3": ("boto3", "s3"), "gcs": ("google.cloud.storage", "gcs")}

REGISTRY = Registry("target", TargetConfig, ENTRY_POINT_GROUP, BUILTIN)


def target_types() -> dict[str, PluginType[TargetConfig]]:
    """Every known target type: built-ins first, then entry points (built-ins win)."""
    return REGISTRY.types


def create_target(config: TargetConfig) -> Target:
    """Build the target for one ``[[targets]]`` entry.

    Raises:
        ConfigError: the SDK the type needs is not installed.
    """
    try:
        target: Target = target_types()[config.type].create(config)
    except ImportError as exc:
        module, extra = _SDK_EXTRA.get(config.type, (exc.name or "?", ""))
        hint = f"pip install 'conexa-backup[{extra}]'" if extra else f"install {module}"
        raise ConfigError(f"target {config.name!r} (type {config.type}) needs {module}: "
                          f"{hint}") from None
    return target
