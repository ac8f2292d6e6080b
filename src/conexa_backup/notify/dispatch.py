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


def chosen(configs: Sequence[NotifierConfig], event: Event, *,
           requested: bool = False) -> list[NotifierConfig]:
    """The notifiers ``event`` goes to: those that want it (their ``events``).

    An event a person asked for by name (``report --send``) goes, when none wants it, to every
    notifier that shows a message to someone: asking to send it is the request. Pings
    (heartbeats) are left out, as their success ping would claim a run that did not happen.
    """
    wanting = [c for c in configs if c.wants(event)]
    if wanting or not requested:
        return wanting
    return [c for c in configs if c.delivers_messages]


def dispatch(configs: Sequence[NotifierConfig], event: Event, *,
             requested: bool = False) -> list[Delivery]:
    """Send ``event`` to the :func:`chosen` notifiers; return how each delivery went."""
    notifiers = chosen(configs, event, requested=requested)
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
               for i, c in enumerate(notifiers)]
    for t in threads:
        signals.start(t)
    for i, (t, c) in enumerate(zip(threads, notifiers, strict=True)):
        # Each notifier bounds itself (timeout x retries, plus backoff); allow for that.
        t.join(c.timeout * c.retries + 20 * c.retries)
        if i not in results:
            results[i] = Delivery(c.label(), False, "did not finish in time")
    return [results[i] for i in range(len(notifiers))]
