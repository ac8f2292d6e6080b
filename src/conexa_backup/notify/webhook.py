"""``type = "webhook"``: a JSON POST of the event (schema in README, "Alerts"), for anything
else: Teams or Discord through a relay, PagerDuty, a Conexa admin endpoint."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr

from conexa_backup.notify import http
from conexa_backup.notify.base import Event, NotifierConfig


class WebhookConfig(NotifierConfig):
    type_name: ClassVar[str] = "webhook"
    type: Literal["webhook"]
    url: SecretStr
    headers: dict[str, SecretStr] = Field(default_factory=dict)  # e.g. an Authorization token


class WebhookNotifier:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config

    def send(self, event: Event) -> None:
        headers = {k: v.get_secret_value() for k, v in self.config.headers.items()}
        http.request(self.config.url.get_secret_value(), payload=event.to_json(),
                     headers=headers, timeout=self.config.timeout, retries=self.config.retries,
                     what=f"webhook notifier {self.config.label()!r}")


def create(config: WebhookConfig) -> WebhookNotifier:
    return WebhookNotifier(config)
