"""``type = "slack"``: a Slack incoming webhook (the seed's ``SLACK_WEBHOOK_URL``).

The webhook URL is a secret (anyone holding it can post): it is never logged or printed.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import SecretStr

from conexa_backup.notify import http
from conexa_backup.notify.base import Event, NotifierConfig

ICONS = {"success": ":white_check_mark:", "partial": ":warning:", "failure": ":x:",
         "start": ":hourglass_flowing_sand:"}


class SlackConfig(NotifierConfig):
    type_name: ClassVar[str] = "slack"
    type: Literal["slack"]
    webhook_url: SecretStr


class SlackNotifier:
    def __init__(self, config: SlackConfig) -> None:
        self.config = config

    def message(self, event: Event) -> dict[str, object]:
        # Slack's mrkdwn reserves &, < and >: escape them as its documentation says.
        full = f"{event.title}\n{event.summary}" if event.summary is not None else event.text()
        text = full.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        head, _, rest = text.partition("\n")
        icon = ICONS.get(event.outcome, "")
        body = rest.replace("\nerror:\n", "\n*error:*\n```") + ("```" if event.error else "")
        return {"text": f"{icon} *{head}*\n{body}".strip()}

    def send(self, event: Event) -> None:
        http.request(self.config.webhook_url.get_secret_value(), payload=self.message(event),
                     timeout=self.config.timeout, retries=self.config.retries,
                     what=f"slack notifier {self.config.label()!r}")


def create(config: SlackConfig) -> SlackNotifier:
    return SlackNotifier(config)
