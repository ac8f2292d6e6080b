"""Durations in config files: ``"30d"``, ``"12h"``, ``"2w"``, ``"90m"`` (minutes), ``"45s"``."""

from __future__ import annotations

from datetime import timedelta

_UNITS = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1),
          "d": timedelta(days=1), "w": timedelta(weeks=1)}


def parse_duration(text: str) -> timedelta:
    """Parse a duration; raise ValueError (with the accepted forms) otherwise."""
    value, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit not in _UNITS or not value.isdigit() or int(value) <= 0:
        raise ValueError(f"invalid duration {text!r}: use a number and d, h, w, m (minutes) "
                         "or s")
    return int(value) * _UNITS[unit]


def human_duration(delta: timedelta) -> str:
    """The shortest of ``30d`` / ``36h`` / ``90m`` that is exact."""
    seconds = int(delta.total_seconds())
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
