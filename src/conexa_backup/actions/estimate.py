"""How long a restore will take, from measured recoveries only.

The rule: the newest passing drills (``verify --drill``, :mod:`conexa_backup.actions.drill`)
give a recovery rate (stored bytes over recovery seconds, summed over up to
:data:`DRILLS_USED` drills); the estimate is the bytes this restore reads at that rate. A drill
times fetching, restoring and proving the backup; a restore in place also takes a safety
backup first, which this does not count. Without a passing drill of known size there is no
estimate (None), and the reason says so: never a made-up constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from conexa_backup.manifest import Manifest

DRILLS_USED = 3
NO_DRILL = ("no passing drill yet: restore times are measured by drills "
            "(`conexa-backup verify --drill`)")
_PARTS = {"database": ("database", "globals"), "uploads": ("uploads", "uploads-index")}


@dataclass(frozen=True)
class Estimate:
    """A restore's expected duration (``seconds`` None: unknown, see ``reason``)."""

    size_bytes: int  # what the restore reads
    seconds: int | None = None
    reason: str | None = None  # why there is no estimate
    bytes_per_second: float | None = None
    drills: list[str] = field(default_factory=list)  # "<id> on <target>", measured from

    @property
    def text(self) -> str | None:
        """``seconds`` as the admin panel shows it (Portuguese, as the seed's "15 minutos")."""
        return None if self.seconds is None else human_duration(self.seconds)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "text": self.text, "reason": self.reason,
                "size_bytes": self.size_bytes, "bytes_per_second": self.bytes_per_second,
                "drills": self.drills}


def restore_size(manifest: Manifest, only: str | None = None) -> int:
    """The stored bytes a restore of ``only`` ("database", "uploads", None: both) reads."""
    kinds = _PARTS.get(only or "", ())
    return sum(a.size for a in manifest.artifacts if not kinds or a.kind in kinds)


def restore_estimate(drills: Sequence[Mapping[str, Any]], size_bytes: int,
                     sizes: Mapping[str, int] | None = None) -> Estimate:
    """The estimate for reading ``size_bytes``, from ``drills`` (``state.drills``, oldest
    first). A drill recorded before drills kept their size takes it from ``sizes`` (backup
    id -> stored bytes, from the catalog), or is not used."""
    used: list[tuple[str, float, int]] = []
    for drill in reversed(drills):
        seconds, size = drill.get("recovery_seconds"), drill.get("size_bytes")
        if size is None and sizes is not None:
            size = sizes.get(str(drill.get("backup_id")))
        if (drill.get("ok") is True and isinstance(seconds, int | float) and seconds > 0
                and isinstance(size, int) and size > 0):
            used.append((f"{drill.get('backup_id')} on {drill.get('target')}", seconds, size))
        if len(used) == DRILLS_USED:
            break
    if not used:
        return Estimate(size_bytes, reason=NO_DRILL)
    rate = sum(u[2] for u in used) / sum(u[1] for u in used)
    return Estimate(size_bytes, max(1, math.ceil(size_bytes / rate)),
                    bytes_per_second=round(rate, 1), drills=[u[0] for u in used])


def human_duration(seconds: int) -> str:
    """``seconds`` in Portuguese words, rounded up to the minute: "menos de 1 minuto",
    "15 minutos", "2 horas e 5 minutos"."""
    if seconds < 60:
        return "menos de 1 minuto"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    words = [_plural(hours, "hora", "horas")] if hours else []
    if minutes:
        words.append(_plural(minutes, "minuto", "minutos"))
    return " e ".join(words)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
