"""Sending an event to every notifier that wants it: concurrently, bounded, never raising.

A notifier that fails (timeout, HTTP 500, bad credentials) is logged and reported; it never
changes the run's result nor hides its real error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from conexa_backup import signals
from conexa_backup.notify.base import Event, NotifierConfig
from conexa_backup.notify.registry import create_notifier

log = logging.getLogger(__name__)


@dataclass
class Delivery:
    notifier: str
    ok: bool
    detail: str


def dispatch(configs: Sequence[NotifierConfig], event: Event) -> list[Delivery]:
    """Send ``event`` to the notifiers that want it; return how each delivery went."""
    chosen = [c for c in configs if c.wants(event)]
    results: dict[int, Delivery] = {}

    def send(i: int, config: NotifierConfig) -> None:
        try:
            create_notifier(config).send(event)
            results[i] = Delivery(config.label(), True, "sent")
        except Exception as exc:  # a notifier must never break the run
            results[i] = Delivery(config.label(), False, str(exc) or type(exc).__name__)
            log.error("notification %s/%s via %s failed: %s", event.kind, event.outcome,
                      config.label(), exc)

    threads = [threading.Thread(target=send, args=(i, c), daemon=True)
               for i, c in enumerate(chosen)]
    for t in threads:
        signals.start(t)
    for i, (t, c) in enumerate(zip(threads, chosen, strict=True)):
        # Each notifier bounds itself (timeout x retries, plus backoff); allow for that.
        t.join(c.timeout * c.retries + 20 * c.retries)
        if i not in results:
            results[i] = Delivery(c.label(), False, "did not finish in time")
    return [results[i] for i in range(len(chosen))]
