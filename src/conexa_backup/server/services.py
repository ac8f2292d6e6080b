"""What the routes share: the config, the token verifier, the jobs, the audit log. One
:class:`Services` per server process, built at start; no web imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conexa_backup.actions.context import Context, NullReporter
from conexa_backup.config.models import Config
from conexa_backup.server.audit import Audit
from conexa_backup.server.auth import Verifier
from conexa_backup.server.jobs import JobStore
from conexa_backup.server.listing import Listing


@dataclass
class Services:
    """The server's long-lived parts. Build with :meth:`build`."""

    config: Config
    config_path: Path
    verifier: Verifier
    jobs: JobStore
    audit: Audit
    secrets: list[str] = field(default_factory=list)
    listing: Listing = field(init=False)  # the list/status cache (server.listing)

    def __post_init__(self) -> None:
        self.listing = Listing(self.context(), self.redact)

    @classmethod
    def build(cls, config: Config, config_path: Path) -> Services:
        """Raises ConfigError as :func:`auth.verify_startup` does."""
        ctx = Context(config, config_path, NullReporter())
        return cls(config, config_path, Verifier(config),
                   JobStore(config.state_dir, config_path), Audit(config.state_dir),
                   secrets=ctx.secrets())

    def context(self) -> Context:
        """A fresh action context (cheap): what one request's action runs with."""
        return Context(self.config, self.config_path, NullReporter())

    def redact(self, text: str) -> str:
        """``text`` with every configured secret masked (errors from libraries, servers)."""
        for secret in self.secrets:
            text = text.replace(secret, "********")
        return text

    def invalidate(self) -> None:
        """Forget what is cached of the targets' contents (after a delete): the next list
        or status scans again."""
        self.listing.invalidate()

    def tick(self) -> None:
        """Called about once a second by the server: reap jobs that ended (a backup, a
        restore's safety backup: the list is taken again)."""
        if self.jobs.reap():
            self.invalidate()
