"""Plug-in types found by name: storage targets and notifiers share this mechanism.

A type is a module defining one config model (a subclass of the family's base model whose
``type_name`` is the type's name and whose ``type`` is a ``Literal``) and a
``create(config)`` function. Modules must be cheap to import: SDKs are imported inside
``create`` or the class, so they load only when a thing of that type is configured. Built-in
types are listed by the family; third parties add types through an entry-point group whose
values name such a module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from conexa_backup.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class PluginType(Generic[M]):
    name: str
    config_model: type[M]
    create: Callable[[Any], Any]


class Registry(Generic[M]):
    """The types of one family (``what``: "target", "notifier")."""

    def __init__(self, what: str, base: type[M], group: str, builtin: dict[str, str]) -> None:
        self.what, self.base, self.group, self.builtin = what, base, group, builtin

    def _load(self, name: str, module: ModuleType) -> PluginType[M]:
        models = [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, self.base)
                  and getattr(obj, "type_name", "") == name]
        create = getattr(module, "create", None)
        if len(models) != 1 or not callable(create):
            raise ConfigError(
                f"{self.what} type {name!r} ({module.__name__}) must define one config model "
                f"with type_name = {name!r} and a create() function")
        return PluginType(name, models[0], create)

    @cached_property
    def types(self) -> dict[str, PluginType[M]]:
        """Every known type: built-ins first, then entry points (built-ins win)."""
        found = {n: self._load(n, importlib.import_module(m)) for n, m in self.builtin.items()}
        for ep in _entry_points().get(self.group, []):
            if ep.name not in found:
                found[ep.name] = self._load(ep.name, importlib.import_module(ep.value))
        return found

    def union(self) -> Any:
        """The discriminated union of every type's config model (for pydantic fields)."""
        from typing import Annotated, Union

        from pydantic import Field

        models = tuple(t.config_model for t in self.types.values())
        if len(models) == 1:
            return models[0]
        return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007


@functools.cache
def _entry_points() -> dict[str, list[importlib.metadata.EntryPoint]]:
    """Every installed entry point by group, read once for both families (it reads every
    package's metadata: ~9 ms a time, at each start)."""
    groups: dict[str, list[importlib.metadata.EntryPoint]] = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            groups.setdefault(ep.group, []).append(ep)
    return groups
