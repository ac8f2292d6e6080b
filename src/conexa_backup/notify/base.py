"""What every notifier shares: the event it is sent, its config, and the protocol.

A notifier has one operation, ``send(event)``. Which events reach it is decided once, here
(:meth:`NotifierConfig.wants`), from its ``events`` list: outcomes (``failure``, ``partial``,
``success``, ``start``) and kinds (``backup``, ``restore``, ``drill``, ``prune``, ``verify``,
``report``, ``admin``). Test messages (``notify-test``) reach every notifier. ``admin`` events
(what a person did through the API: "restore of X started by maria@escola") reach only the
notifiers that list ``admin``: they are not runs, and a notifier for failures must not hear
of every click.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conexa_backup.errors import ConexaError

Kind = Literal["backup", "restore", "drill", "prune", "verify", "report", "test", "admin"]
Outcome = Literal["start", "success", "partial", "failure"]
SELECTORS = {"start", "success", "partial", "failure",
             "backup", "restore", "drill", "prune", "verify", "report", "admin"}
SCHEMA = "conexa-backup/event/v1"


class NotifyError(ConexaError):
    """A notifier could not deliver (after its retries)."""


@dataclass
class Event:
    """Something worth telling a person or a machine about."""

    kind: Kind
    outcome: Outcome
    title: str
    host: str = field(default_factory=socket.gethostname)
    time: datetime = field(default_factory=lambda: datetime.now(UTC))
    backup_id: str | None = None
    duration_seconds: float | None = None
    size_bytes: int | None = None
    targets_ok: list[str] = field(default_factory=list)
    targets_failed: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    body: str | None = None  # a prepared text (the periodic report) instead of the facts
    # The same as an HTML page (the report's), for notifiers that can show one (email: the
    # HTML alternative of the text). Not in the webhook payload: a page is no data.
    html: str | None = field(default=None, repr=False)
    summary: str | None = None  # the body in a few lines, for chat (Slack)

    def to_json(self) -> dict[str, Any]:
        """The webhook payload (documented in README, "Alerts")."""
        data = asdict(self)
        del data["html"], data["summary"]
        data["time"] = self.time.isoformat().replace("+00:00", "Z")
        data["targets"] = {"ok": data.pop("targets_ok"), "failed": data.pop("targets_failed")}
        return {"schema": SCHEMA, **data}

    def text(self) -> str:
        """The same facts as plain text, for people (email body, Slack message)."""
        if self.body is not None:
            return f"{self.title}\n{self.body}"
        lines = [self.title, f"host: {self.host}", f"time: {self.to_json()['time']}"]
        if self.backup_id:
            lines.append(f"backup: {self.backup_id}")
        if self.size_bytes is not None:
            lines.append(f"size: {self.size_bytes / 1e6:.1f} MB")
        if self.duration_seconds is not None:
            lines.append(f"duration: {self.duration_seconds:.1f} s")
        if self.targets_ok:
            lines.append(f"stored on: {', '.join(self.targets_ok)}")
        lines += [f"FAILED on {name}: {why}" for name, why in self.targets_failed.items()]
        lines += [f"{k}: {v}" for k, v in self.details.items() if not isinstance(v, dict | list)]
        if self.error:
            lines += ["", "error:", self.error]
        return "\n".join(lines)


class NotifierConfig(BaseModel):
    """Fields common to every ``[[notify]]`` entry; each type subclasses it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type_name: ClassVar[str] = ""
    default_events: ClassVar[tuple[str, ...]] = ("failure",)
    # False for pings that only say "a run happened" (heartbeats): never sent a report unasked.
    delivers_messages: ClassVar[bool] = True
    type: str
    name: str | None = None
    events: list[str] | None = None  # default: failures only (see module docstring)
    timeout: float = Field(default=10.0, gt=0, le=300)
    retries: int = Field(default=3, ge=1, le=10)

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or []) - SELECTORS)
        if unknown:
            raise ValueError(f"unknown event(s) {', '.join(unknown)}; "
                             f"use: {', '.join(sorted(SELECTORS))}")
        return value

    def label(self) -> str:
        return self.name or self.type

    def wants(self, event: Event) -> bool:
        if event.kind == "test":
            return True
        selected = set(self.events if self.events is not None else self.default_events)
        if event.kind == "admin":  # never by outcome: a failed click is not a failed run
            return "admin" in selected
        if event.outcome == "start":  # start pings only where asked for explicitly
            return "start" in selected
        return event.outcome in selected or event.kind in selected


class Notifier(Protocol):
    def send(self, event: Event) -> None:
        """Deliver ``event``; raise NotifyError when it could not be delivered."""
