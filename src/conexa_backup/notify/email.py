"""``type = "email"``: a plain-text email over SMTP (the seed's ``BACKUP_NOTIFY_EMAIL``).

STARTTLS (default, port 587), implicit TLS (``security = "tls"``, port 465) or plain
(``"none"``, for a local relay); login when a username is set; several recipients.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, SecretStr

from conexa_backup.notify.base import Event, NotifierConfig, NotifyError

if TYPE_CHECKING:  # smtplib and email load when a message is sent, not with every config
    from email.message import EmailMessage

log = logging.getLogger(__name__)


class EmailConfig(NotifierConfig):
    type_name: ClassVar[str] = "email"
    type: Literal["email"]
    host: str = "localhost"
    port: int | None = None
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    sender: str = Field(default="conexa-backup@localhost", alias="from")
    to: list[str] = Field(min_length=1)
    cafile: Path | None = None  # a private CA, e.g. for an internal relay


class EmailNotifier:
    def __init__(self, config: EmailConfig) -> None:
        self.config = config

    def message(self, event: Event) -> EmailMessage:
        from email.message import EmailMessage
        msg = EmailMessage()
        msg["Subject"] = f"[conexa-backup] {event.title}"
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.to)
        msg.set_content(event.text() + "\n")
        if event.html is not None:  # the report: its page, the text kept as the alternative
            msg.add_alternative(event.html, subtype="html")
        return msg

    def _password(self) -> str | None:
        c = self.config
        if c.password_file is not None:
            try:
                return c.password_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise NotifyError(f"email notifier: cannot read password_file: "
                                  f"{exc.strerror}") from None
        return c.password.get_secret_value() if c.password else None

    def _deliver(self, msg: EmailMessage) -> None:
        import smtplib
        import ssl
        c = self.config
        context = ssl.create_default_context(cafile=str(c.cafile) if c.cafile else None)
        port = c.port or {"starttls": 587, "tls": 465, "none": 25}[c.security]
        smtp: smtplib.SMTP
        if c.security == "tls":
            smtp = smtplib.SMTP_SSL(c.host, port, timeout=c.timeout, context=context)
        else:
            smtp = smtplib.SMTP(c.host, port, timeout=c.timeout)
        with smtp:
            if c.security == "starttls":
                smtp.starttls(context=context)
            password = self._password()
            if c.username and password is not None:
                smtp.login(c.username, password)
            smtp.send_message(msg)

    def send(self, event: Event) -> None:
        import smtplib
        msg = self.message(event)
        what = f"email notifier {self.config.label()!r}"
        for attempt in range(1, self.config.retries + 1):
            try:
                self._deliver(msg)
                return
            except smtplib.SMTPAuthenticationError as exc:
                raise NotifyError(f"{what}: login refused ({exc.smtp_code})") from None
            except smtplib.SMTPRecipientsRefused:
                raise NotifyError(f"{what}: recipients refused") from None
            except (smtplib.SMTPException, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                if attempt == self.config.retries:
                    raise NotifyError(f"{what}: {last}") from None
                log.info("%s: %s; retrying", what, last)
                time.sleep(min(2.0 ** (attempt - 1), 8.0))


def create(config: EmailConfig) -> EmailNotifier:
    return EmailNotifier(config)
