"""The audit log: who read backup contents or changed anything, as one JSON line each in
``state_dir/audit.log`` (0600, append-only). No web imports: routes pass plain values.

Secrets and tokens are never written: a line holds the caller's subject (a machine token's
name, never the token), the client address, the action, the backup id and the outcome.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from conexa_backup.logs import LOGGER
from conexa_backup.server.job import now
from conexa_backup.state import private_dir

AUDIT_LOG = "audit.log"
_log = logging.getLogger(LOGGER)


@dataclass
class Entry:
    """One audited request."""

    action: str  # download, trigger, restore, delete, cancel, token
    sub: str
    client: str | None
    outcome: str  # "ok", "refused: <code>", "failed: <code>"
    backup_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    time: str = field(default_factory=now)


class Audit:
    """Appends :class:`Entry` lines to ``state_dir/audit.log``; thread-safe."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AUDIT_LOG
        self._mutex = threading.Lock()

    def record(self, entry: Entry) -> None:
        """Append ``entry`` as one line. A full disk must not fail the request it records
        (the request's own outcome stands): it is logged instead."""
        line = json.dumps(asdict(entry), sort_keys=True, ensure_ascii=False) + "\n"
        try:
            with self._mutex:
                private_dir(self.path.parent)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        except OSError as exc:
            _log.error("could not write the audit log %s: %s", self.path, exc)
