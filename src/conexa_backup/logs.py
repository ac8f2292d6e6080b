"""The per-run log file under ``state_dir/logs`` (one file a day, like the seed's)."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from conexa_backup.state import private_dir

LOGGER = "conexa_backup"
# Without a handler, Python's last-resort handler would echo records on stderr, doubling the
# CLI's own error line; records go only where we send them.
logging.getLogger(LOGGER).addHandler(logging.NullHandler())
_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def log_path(state_dir: Path, now: datetime | None = None) -> Path:
    day = (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    return state_dir / "logs" / f"backup-{day}.log"


def start_file_log(state_dir: Path) -> Path:
    """Send this run's log records (INFO and up) to today's file; return its path."""
    path = log_path(state_dir)
    private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return path


def stop_file_logs() -> None:
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)
