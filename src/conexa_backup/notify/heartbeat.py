"""``type = "heartbeat"``: the dead man's switch (healthchecks.io, Uptime Kuma, Cronitor style).

A URL is pinged when a backup starts, succeeds and fails; the monitoring service alerts when
the success ping does not arrive on schedule, which catches the cron job that never ran.
Defaults follow healthchecks.io: ``<url>/start``, ``<url>``, ``<url>/fail``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from conexa_backup.notify import http
from conexa_backup.notify.base import Event, NotifierConfig


class HeartbeatConfig(NotifierConfig):
    type_name: ClassVar[str] = "heartbeat"
    delivers_messages: ClassVar[bool] = False
    type: Literal["heartbeat"]
    url: SecretStr
    start_url: SecretStr | None = None
    success_url: SecretStr | None = None
    failure_url: SecretStr | None = None
    kinds: list[str] = Field(default_factory=lambda: ["backup"])  # runs that ping

    def wants(self, event: Event) -> bool:
        return event.kind == "test" or event.kind in self.kinds


class HeartbeatNotifier:
    def __init__(self, config: HeartbeatConfig) -> None:
        self.config = config

    def url_for(self, event: Event) -> str:
        c = self.config
        base = c.url.get_secret_value().rstrip("/")
        chosen = {"start": c.start_url, "failure": c.failure_url}.get(event.outcome,
                                                                        c.success_url)
        if chosen is not None:
            return chosen.get_secret_value()
        return {"start": f"{base}/start", "failure": f"{base}/fail"}.get(event.outcome, base)

    def send(self, event: Event) -> None:
        # A partial backup pings success: a copy exists; the failure alert goes elsewhere.
        payload = {"text": event.text()} if event.outcome != "start" else None
        http.request(self.url_for(event), payload=payload, timeout=self.config.timeout,
                     retries=self.config.retries,
                     what=f"heartbeat {self.config.label()!r} ({event.outcome})")


def create(config: HeartbeatConfig) -> HeartbeatNotifier:
    return HeartbeatNotifier(config)
