"""The tool's own history as chart series (issue 16): what the status page and the HTML report
draw (each series named by a key: ``database``, ``uploads``, ``backup``, ``drill``, ``gap``;
the page names them in its language), from the same facts as ``status`` and ``report``
(``state_dir``'s runs and drills, and the catalog of complete backups on the targets).

- **Size**: per complete backup, its database dump (the database and globals artifacts, as
  stored) and its uploads (the files' own size, as the manifest says).
- **Duration**: per backup run, how long it took; a failed run is a failed point.
- **Recovery**: per restore drill, its recovery time; a failed drill is a failed point; the
  RTO objective is drawn.
- **Gaps**: per scheduled backup with a good copy, the time since the one before (the first
  in the period: since the last before it, if any), and the gap still open now; the RPO
  objective (``max_backup_age``) is drawn. The report's RPO verdict is measured on the same
  gaps (:func:`monitor.backup_gaps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from conexa_backup.actions.monitor import backup_gaps, parse_time, restorable_times
from conexa_backup.charts import Point, Series
from conexa_backup.durations import parse_duration
from conexa_backup.state import drills, runs

if TYPE_CHECKING:
    from conexa_backup.actions.context import Context
    from conexa_backup.catalog import Backup

_DATABASE_KINDS = ("database", "globals")


@dataclass(frozen=True)
class History:
    """The series of one period, and the objectives they are drawn against (seconds)."""

    start: datetime
    end: datetime
    sizes: list[Series]
    durations: list[Series]
    recovery: list[Series]
    gaps: list[Series]
    rto_seconds: float
    rpo_seconds: float


def history(ctx: Context, days: int, now: datetime | None = None,
            catalog: Sequence[Backup] | None = None,
            recorded: tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]] | None = None
            ) -> History:
    """The last ``days`` days (to ``now``) as chart series. ``catalog``: the backups found on
    the targets, when the caller has scanned them already; ``recorded``: ``state_dir``'s
    (runs, drills), when the caller has read them already.

    Raises:
        StorageError: every target failed to list (as :meth:`Context.scan`).
    """
    end = now or datetime.now(UTC)
    start = end - timedelta(days=days)
    found = ctx.scan(ctx.targets()) if catalog is None else catalog
    made, drilled = recorded or (runs(ctx.config.state_dir), drills(ctx.config.state_dir))
    complete = sorted((b for b in found if b.manifest is not None and b.complete_copies),
                      key=lambda b: b.manifest.finished_at if b.manifest else end)
    return History(
        start=start, end=end,
        sizes=_sizes(complete),
        durations=[Series("backup", _runs(made))],
        recovery=[Series("drill", _drills(drilled))],
        gaps=[Series("gap", _gaps(found, start, end))],
        rto_seconds=parse_duration(ctx.config.drill.rto_objective).total_seconds(),
        rpo_seconds=parse_duration(ctx.config.monitoring.max_backup_age).total_seconds(),
    )


def _sizes(backups: Sequence[Backup]) -> list[Series]:
    database, uploads = [], []
    for b in backups:
        m = b.manifest
        assert m is not None
        dump = [a.size for a in m.artifacts if a.kind in _DATABASE_KINDS]
        if dump:
            database.append(Point(m.finished_at, float(sum(dump)), b.id))
        if m.uploads is not None:
            uploads.append(Point(m.finished_at, float(m.uploads.bytes), b.id))
    return [Series("database", database), Series("uploads", uploads)]


def _runs(recorded: Sequence[dict[str, Any]]) -> list[Point]:
    points = []
    for r in recorded:
        at, seconds = parse_time(r.get("time")), r.get("duration_seconds")
        if r.get("kind") != "backup" or at is None:
            continue
        failed = r.get("outcome") == "failure"
        label = "failed" if failed else str(r.get("backup_id") or "")
        if r.get("outcome") == "partial":
            label += " (partial)"
        if seconds is None:  # a failed run's event says no duration: drawn at 0, and said
            label += " (duration not recorded)"
        points.append(Point(at, float(seconds or 0.0), label, failed=failed))
    return points


def _drills(recorded: Sequence[dict[str, Any]]) -> list[Point]:
    points = []
    for d in recorded:
        at = parse_time(d.get("started_at"))
        if at is None:
            continue
        label = f"{d.get('backup_id')} from {d.get('target')}"
        points.append(Point(at, float(d.get("recovery_seconds") or 0.0), label,
                            failed=not d.get("ok")))
    return points


def _gaps(backups: Sequence[Backup], start: datetime, now: datetime) -> list[Point]:
    gaps = backup_gaps(restorable_times(backups), start, now)
    return [Point(at, seconds, "open: no backup since" if at == now else "")
            for at, seconds in gaps]
