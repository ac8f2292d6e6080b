"""Target types, found by name.

A target type is a module that defines a config model (a :class:`TargetConfig` subclass whose
``type`` is a ``Literal``) and a ``create(config) -> Target`` function. The module must be cheap
to import: cloud SDKs are imported inside ``create`` or the target class, so they load only
when a target of that type is configured.

Built-in types are listed in ``BUILTIN``; third parties add types through the
``conexa_backup.targets`` entry-point group, whose values name such a module.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, cast

from conexa_backup.errors import ConfigError
from conexa_backup.storage.base import Target, TargetConfig

ENTRY_POINT_GROUP = "conexa_backup.targets"

BUILTIN: dict[str, str] = {
    "local": "conexa_backup.storage.local",
    "s3": "conexa_backup.storage.s3",
    "gcs": "conexa_backup.storage.gcs",
}
# The SDK each built-in type needs, and the extra that installs it.
_SDK_EXTRA = {"s3": ("boto3", "s3"), "gcs": ("google.cloud.storage", "gcs")}


@dataclass(frozen=True)
class TargetType:
    name: str
    config_model: type[TargetConfig]
    create: Callable[[Any], Target]


def _load(name: str, module: ModuleType) -> TargetType:
    models = [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, TargetConfig)
        and getattr(obj, "type_name", "") == name
    ]
    create = getattr(module, "create", None)
    if len(models) != 1 or not callable(create):
        raise ConfigError(
            f"target type {name!r} ({module.__name__}) must define one config model with "
            f"type_name = {name!r} and a create() function"
        )
    return TargetType(name, models[0], cast(Callable[[Any], Target], create))


@cache
def target_types() -> dict[str, TargetType]:
    """Every known target type: built-ins first, then entry points (built-ins win)."""
    found: dict[str, TargetType] = {}
    for name, modname in BUILTIN.items():
        found[name] = _load(name, importlib.import_module(modname))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in found:
            found[ep.name] = _load(ep.name, importlib.import_module(ep.value))
    return found


def create_target(config: TargetConfig) -> Target:
    """Build the target for one ``[[targets]]`` entry.

    Raises:
        ConfigError: the SDK the type needs is not installed.
    """
    try:
        return target_types()[config.type].create(config)
    except ImportError as exc:
        module, extra = _SDK_EXTRA.get(config.type, (exc.name or "?", ""))
        hint = f"pip install 'conexa-backup[{extra}]'" if extra else f"install {module}"
        raise ConfigError(f"target {config.name!r} (type {config.type}) needs {module}: "
                          f"{hint}") from None
