"""Notifier types, found by name (see :mod:`conexa_backup.plugins`).

Third parties add types through the ``conexa_backup.notifiers`` entry-point group.
"""

from __future__ import annotations

from conexa_backup.notify.base import Notifier, NotifierConfig
from conexa_backup.plugins import PluginType, Registry

BUILTIN: dict[str, str] = {
    "slack": "conexa_backup.notify.slack",
    "email": "conexa_backup.notify.email",
    "webhook": "conexa_backup.notify.webhook",
    "heartbeat": "conexa_backup.notify.heartbeat",
}

REGISTRY = Registry("notifier", NotifierConfig, "conexa_backup.notifiers", BUILTIN)


def notifier_types() -> dict[str, PluginType[NotifierConfig]]:
    return REGISTRY.types


def create_notifier(config: NotifierConfig) -> Notifier:
    notifier: Notifier = notifier_types()[config.type].create(config)
    return notifier
