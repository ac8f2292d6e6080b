"""``status`` (Nagios-style health), the Prometheus textfile, and the periodic ``report``.

Status levels follow the Nagios plugin convention so ``status`` plugs into existing monitoring:
OK (0); WARNING (1): no successful drill within ``max_drill_age``, the newest drill on a
target failed (for any reason, until a later one passes), a copy on a target is
damaged (found bad by a verify, drill or restore, see ``Copy.state``), a target's newest
backup was stored with warnings or suspect uploads (an empty or shrunken folder), or the last
backup run failed or was partial while copies are still fresh; CRITICAL (2): a target's
newest *trusted* backup (``Backup.trusts``: complete, not damaged, uploads not suspect) is
older than ``max_backup_age`` (or there is none), or a restore's swap was interrupted and
not yet settled (the restore journal is pending: the live database and uploads may come from
different backups until a locked run finishes or undoes it); UNKNOWN (3): the state cannot be
read (bad config, a target that cannot be listed). Incomplete copies (no manifest) are counted
and sized (``incomplete``), not judged: prune removes them after a day.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from conexa_backup.actions.context import Context
from conexa_backup.actions.incomplete import Incomplete, incomplete
from conexa_backup.catalog import Backup
from conexa_backup.durations import human_duration, parse_duration
from conexa_backup.manifest import Manifest
from conexa_backup.state import (
    RESTORE_PENDING,
    atomic_write,
    checks,
    drill_records,
    drills,
    restore_pending,
    runs,
)

if TYPE_CHECKING:
    from conexa_backup.config.models import Config

LEVELS = ("OK", "WARNING", "CRITICAL", "UNKNOWN")
# How bad, to combine targets: a target with no backup (CRITICAL) must not hide behind
# another one that cannot be read (UNKNOWN).
SEVERITY = {0: 0, 3: 1, 1: 2, 2: 3}


def worst(levels: Sequence[int]) -> int:
    return max(levels, key=SEVERITY.__getitem__, default=0)


@dataclass
class TargetHealth:
    target: str
    level: int
    newest_backup: str | None = None
    backup_age_seconds: float | None = None
    newest_drill: dict[str, Any] | None = None
    drill_age_seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    damaged: list[dict[str, Any]] = field(default_factory=list)  # see damaged_copies
    max_age_seconds: float | None = None  # what the newest backup is held to (expected_age)
    age_rule: str | None = None  # and why, for people


@dataclass
class Health:
    level: int
    targets: list[TargetHealth]
    last_run: dict[str, Any] | None
    summary: str
    incomplete: int = 0
    last: Backup | None = None  # the newest trusted backup anywhere (Backup.trusted)
    age_seconds: float | None = None
    last_drill: dict[str, Any] | None = None
    leftovers: Incomplete = field(default_factory=Incomplete)  # incomplete copies, sized
    restore_pending: bool = False  # an interrupted restore's journal (CRITICAL)

    @property
    def label(self) -> str:
        return LEVELS[self.level]


def parse_time(text: object) -> datetime | None:
    """A recorded ISO time (UTC when it names no zone), or None when it is not one."""
    try:
        at = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def damaged_copies(backups: Sequence[Backup], target: str | None = None) -> list[dict[str, Any]]:
    """Every damaged copy (on ``target``, or anywhere), newest first: id, target, when, why."""
    found = []
    for b in reversed(backups):
        for c in b.copies:
            why = c.why_damaged
            if why is not None and target in (None, c.target.name):
                found.append({"id": b.id, "target": c.target.name, "at": why[0], "why": why[1]})
    return found


# An archive tier (retention.Policy.period_tier) receives the first backup of each period:
# its newest backup is up to one period old by design. The longest such period, by rule.
_TIER_PERIODS = (("keep_weekly", "weekly", timedelta(days=7)),
                 ("keep_monthly", "monthly", timedelta(days=31)),
                 ("keep_yearly", "yearly", timedelta(days=366)))


def expected_age(config: Config, target: str) -> tuple[timedelta, str]:
    """How old ``target``'s newest good backup may be before ``status`` is CRITICAL, and the
    rule that says so, for people: the target's own ``max_backup_age``; else, for an archive
    tier (only weekly/monthly/yearly rules: it is sent the first backup of each period), its
    shortest period plus ``[monitoring] max_backup_age``; else ``max_backup_age``."""
    own = next((t.max_backup_age for t in config.targets if t.name == target), None)
    if own is not None:
        return parse_duration(own), f"the target's max_backup_age ({own})"
    base = config.monitoring.max_backup_age
    policy = config.retention_for(target).policy()
    if policy.period_tier:
        for field_name, label, period in _TIER_PERIODS:
            if getattr(policy, field_name) not in (None, 0):
                return (period + parse_duration(base),
                        f"{label} archive tier: {human_duration(period)} + max_backup_age "
                        f"({base})")
    return parse_duration(base), f"max_backup_age ({base})"


def _stored_with_problems(backup: Backup, manifest: Manifest) -> str | None:
    """Why a target's newest backup, though complete, needs a look: its uploads were suspect
    (an empty or shrunken folder: a volume not mounted) or the run stored it with warnings
    (files it could not read...); None when it was clean."""
    if manifest.uploads is not None and manifest.uploads.suspect is not None:
        return f"newest backup {backup.id}: uploads suspect: {manifest.uploads.suspect}"
    if manifest.warnings:
        more = f" (and {len(manifest.warnings) - 1} more)" if len(manifest.warnings) > 1 else ""
        return f"newest backup {backup.id} has warnings: {manifest.warnings[0]}{more}"
    return None


def _target_health(ctx: Context, name: str, backups: Sequence[Backup],
                   now: datetime) -> TargetHealth:
    health = TargetHealth(name, 0, damaged=damaged_copies(backups, name))
    here = [(b, c) for b in backups for c in b.copies if c.target.name == name]
    good = [b for b, c in here if c.state == "complete"]
    trusted = [b for b, c in here if b.trusts(c)]  # suspect uploads are not a fresh backup
    if trusted and (manifest := trusted[-1].manifest) is not None:
        health.newest_backup = trusted[-1].id
        # Never a negative age: a clock behind the backup's is said once, by health().
        health.backup_age_seconds = max(0.0, (now - manifest.finished_at).total_seconds())
    if good and (manifest := good[-1].manifest) and (why := _stored_with_problems(good[-1],
                                                                                   manifest)):
        health.level = 1  # a green status after a backup of an empty folder would lie
        health.problems.append(why)
    for d in health.damaged:  # a bad copy is worth a look even while a good one is fresh
        health.level = 1
        since = f" since {d['at'][:16].replace('T', ' ')}" if d["at"] else ""
        health.problems.append(f"{d['id']} damaged{since}: {d['why']}")
    max_age, health.age_rule = expected_age(ctx.config, name)
    health.max_age_seconds = max_age.total_seconds()
    # Say "good" where some complete backups are not (damaged, or uploads suspect).
    good_ = "good " if health.damaged or len(trusted) != len(good) else ""
    if health.backup_age_seconds is None:
        health.level = 2
        health.problems.append(f"no {good_ or 'complete '}backup")
    elif health.backup_age_seconds > health.max_age_seconds:
        health.level = 2
        health.problems.append(f"newest {good_}backup older than "
                               f"{human_duration(max_age)} ({health.age_rule})")
    _drill_health(ctx, health, now)
    return health


def _drill_health(ctx: Context, health: TargetHealth, now: datetime) -> None:
    """WARNING when no drill passed within ``max_drill_age``, or when the newest drill on the
    target failed, for any reason (a check query, pg_restore, differing counts; not only
    damage): it stays said until a later drill passes; and when the newest drill there could
    not run (no age identity here), said as such, never as a failure."""
    mon = ctx.config.monitoring
    here = [d for d in drills(ctx.config.state_dir) if d.get("target") == health.target]
    if here and not here[-1].get("ok"):
        health.level = max(health.level, 1)
        health.problems.append(drill_failure(here[-1]))
    tried = [d for d in drill_records(ctx.config.state_dir) if d.get("target") == health.target]
    if tried and tried[-1].get("outcome") == "not_run":  # since the newest drill that ran
        health.level = max(health.level, 1)
        health.problems.append(could_not_drill(tried[-1]))
    passed = [d for d in here if d.get("ok")]
    when = parse_time(passed[-1].get("started_at")) if passed else None
    if passed and when is not None:
        health.newest_drill = passed[-1]
        health.drill_age_seconds = (now - when).total_seconds()
    if when is None or (now - when) > parse_duration(mon.max_drill_age):
        health.level = max(health.level, 1)
        health.problems.append(f"no successful restore drill within {mon.max_drill_age}")


def first_line(text: object) -> str:
    return (str(text or "").strip() or "?").splitlines()[0]


def drill_failure(drill: dict[str, Any]) -> str:
    """One line for a failed recorded drill: which backup, when, and its failed steps."""
    steps = [s for s in drill.get("steps") or [] if isinstance(s, dict) and not s.get("ok")]
    why = "; ".join(f"{s.get('name')}: {first_line(s.get('detail'))}" for s in steps)
    why = why or "no step ran"
    at = str(drill.get("started_at") or "?")[:16].replace("T", " ")
    return f"restore drill of {drill.get('backup_id')} failed at {at}: {why}"


def could_not_drill(drill: dict[str, Any]) -> str:
    """One line for a recorded drill that could not run here: which backup, when, why."""
    at = str(drill.get("started_at") or "?")[:16].replace("T", " ")
    return (f"could not drill {drill.get('backup_id')} at {at} (not run, not a failure): "
            f"{first_line(drill.get('not_run'))}")


def health(ctx: Context, now: datetime | None = None,
           scanned: tuple[Sequence[Backup], Mapping[str, str]] | None = None) -> Health:
    """The health of every target (see module docstring for the levels). ``scanned``: the
    (backups, unreachable targets) of a scan of every target already made (the server's
    list cache); by default the targets are listed here.

    Raises:
        StorageError: no target could be listed (:func:`catalog.scan`).
    """
    now = now or datetime.now(UTC)
    unreachable: dict[str, str] = {}
    if scanned is None:
        backups: Sequence[Backup] = ctx.scan(ctx.targets(), unreachable=unreachable)
    else:
        backups, unreachable = scanned[0], dict(scanned[1])
    targets = []
    for target in ctx.targets():
        if target.name in unreachable:
            targets.append(TargetHealth(target.name, 3, problems=[unreachable[target.name]]))
        else:
            targets.append(_target_health(ctx, target.name, backups, now))
    recorded_runs = runs(ctx.config.state_dir)
    backup_runs = [r for r in recorded_runs if r.get("kind") == "backup"]
    last = backup_runs[-1] if backup_runs else None
    level = worst([t.level for t in targets])
    problems = [f"{t.target}: {p}" for t in targets for p in t.problems]
    if last is not None and last.get("outcome") in ("failure", "partial"):
        level = worst([level, 1])
        problems.append(f"last backup run: {last.get('outcome')}")
    for why in (_verify_failed(recorded_runs), _clock_behind(backups, now)):
        if why is not None:
            level = worst([level, 1])
            problems.append(why)
    pending = restore_pending(ctx.config.state_dir)
    if pending:  # first: nothing else in the summary matters as much
        level = worst([level, 2])
        problems.insert(0, RESTORE_PENDING)
    summary = "; ".join(problems) if problems else _ok_summary(targets)
    good = [b for b in backups if b.trusted and b.manifest is not None]
    newest = good[-1] if good else None
    age = max(0.0, (now - newest.manifest.finished_at).total_seconds()) \
        if newest is not None and newest.manifest is not None else None
    recorded = drills(ctx.config.state_dir)
    return Health(level, targets, last, summary,
                  sum(1 for b in backups if not b.complete_copies), newest, age,
                  recorded[-1] if recorded else None, incomplete(backups), pending)


CLOCK_SLACK = timedelta(minutes=5)  # hosts' clocks disagree by seconds; a step is more


def _clock_behind(backups: Sequence[Backup], now: datetime) -> str | None:
    """A warning when this host's clock is behind the newest complete backup's finish
    (a clock stepped back: ages would be negative and a new backup would be refused)."""
    dated = [(m.finished_at, b.id) for b in backups if (m := b.manifest) is not None]
    if not dated or (newest := max(dated))[0] <= now + CLOCK_SLACK:
        return None
    return (f"this host's clock ({now:%Y-%m-%d %H:%M} UTC) is behind the newest backup, "
            f"{newest[1]}, which finished at {newest[0]:%Y-%m-%d %H:%M} UTC: fix the clock")


def _verify_failed(recorded: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the newest ``verify`` run failed (for any reason: damage, a target that could not
    be read, no backup to verify), said until a later verify passes; None when it passed or
    none ran. Damage it proved is also shown per copy; this says the check itself failed."""
    verifies = [r for r in recorded if r.get("kind") == "verify"]
    if not verifies or verifies[-1].get("outcome") != "failure":
        return None
    newest = verifies[-1]
    at = str(newest.get("time") or "?")[:16].replace("T", " ")
    return f"last verify run failed at {at}: {first_line(newest.get('error'))}"


def _ok_summary(targets: Sequence[TargetHealth]) -> str:
    ages = [t.backup_age_seconds for t in targets if t.backup_age_seconds is not None]
    drill_ages = [t.drill_age_seconds for t in targets if t.drill_age_seconds is not None]
    age = human_duration(timedelta(minutes=int(max(ages) // 60) or 1))
    drill = human_duration(timedelta(minutes=int(max(drill_ages) // 60) or 1))
    return (f"newest backup at most {age} old on all {len(targets)} target(s); "
            f"drilled within {drill}")


# -- Prometheus textfile ------------------------------------------------------------------------

def _number(value: float) -> str:
    """Exact: integers as integers, floats with every digit (timestamps need them all)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def metrics_text(ctx: Context) -> str:
    """node_exporter textfile metrics from the recorded runs and drills."""
    lines: list[str] = []

    def gauge(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        if samples:
            lines.extend([f"# HELP conexa_backup_{name} {help_text}",
                          f"# TYPE conexa_backup_{name} gauge"])
            lines.extend(f"conexa_backup_{name}{labels} {_number(value)}"
                         for labels, value in samples)

    history = runs(ctx.config.state_dir)
    last: dict[str, dict[str, Any]] = {}
    last_ok: dict[str, dict[str, Any]] = {}
    per_target: dict[str, float] = {}
    for run in history:
        kind = str(run.get("kind"))
        last[kind] = run
        when = parse_time(run.get("time"))
        if run.get("outcome") in ("success", "partial") and when is not None:
            last_ok[kind] = run
            if kind == "backup":
                for target in (run.get("targets") or {}).get("ok", []):
                    per_target[target] = when.timestamp()
    ts = {k: (parse_time(r.get("time")) or datetime.fromtimestamp(0, UTC)).timestamp()
          for k, r in last.items()}
    gauge("last_run_timestamp_seconds", "End of the last run, by kind.",
          [(f'{{kind="{k}"}}', v) for k, v in ts.items()])
    gauge("last_run_success", "1 if the last run of that kind succeeded (partial counts 0).",
          [(f'{{kind="{k}"}}', float(r.get("outcome") == "success")) for k, r in last.items()])
    gauge("last_run_duration_seconds", "Duration of the last run, by kind.",
          [(f'{{kind="{k}"}}', float(r["duration_seconds"])) for k, r in last.items()
           if r.get("duration_seconds") is not None])
    gauge("last_success_timestamp_seconds", "End of the last successful run, by kind.",
          [(f'{{kind="{k}"}}', (parse_time(r.get("time")) or datetime.now(UTC)).timestamp())
           for k, r in last_ok.items()])
    gauge("last_backup_size_bytes", "Stored size of the last successful backup.",
          [("", float(last_ok["backup"]["size_bytes"]))]
          if "backup" in last_ok and last_ok["backup"].get("size_bytes") is not None else [])
    last_backup = last.get("backup")
    warned = (last_backup.get("details") or {}).get("warnings") if last_backup else None
    gauge("last_backup_warnings", "Warnings of the last backup run: uploads empty or shrunken, "
          "files it could not read (alert on > 0).",
          [("", float(len(warned or [])))] if last_backup is not None else [])
    gauge("target_last_success_timestamp_seconds", "Last backup stored on each target.",
          [(f'{{target="{t}"}}', v) for t, v in per_target.items()])
    newest: dict[str, dict[str, Any]] = {str(d.get("target")): d
                                         for d in drills(ctx.config.state_dir)}
    gauge("drill_last_success", "1 if the last restore drill of the target's copy passed.",
          [(f'{{target="{t}"}}', float(bool(d.get("ok")))) for t, d in newest.items()])
    gauge("drill_recovery_seconds", "Recovery time measured by the last drill (RTO).",
          [(f'{{target="{t}"}}', float(d.get("recovery_seconds") or 0))
           for t, d in newest.items()])
    gauge("drill_last_timestamp_seconds", "Start of the last drill, by target.",
          [(f'{{target="{t}"}}', (parse_time(d.get("started_at")) or datetime.now(UTC))
            .timestamp()) for t, d in newest.items()])
    # From the record of copies seen bad (no listing: this runs after every run, also when a
    # target is down); a copy leaves it when a verify or drill passes, when it is deleted,
    # and when a listing of its target (any scan: every run has one) no longer shows it.
    damaged = checks(ctx.config.state_dir).damaged
    gauge("target_damaged_copies", "Copies found bad by a verify, drill or restore and not "
          "verified since (alert on > 0).",
          [(f'{{target="{t.name}"}}', float(sum(1 for _, where in damaged if where == t.name)))
           for t in ctx.config.targets])
    # Written by verify and drills too (not locked: they never settle it), so a restore a
    # kill left half-swapped alerts before the next locked run.
    gauge("restore_pending", "1 while an interrupted restore's journal is pending: uploads "
          "and database may come from different backups (alert on 1).",
          [("", float(restore_pending(ctx.config.state_dir)))])
    return "\n".join(lines) + "\n"


def write_metrics(ctx: Context) -> None:
    """Write the textfile atomically (node_exporter must never read half a file)."""
    path = ctx.config.monitoring.metrics_file
    if path is not None:  # read by node_exporter; holds no secret
        atomic_write(path, metrics_text(ctx).encode(), mode=0o644)


# -- report --------------------------------------------------------------------------------------

def restorable_times(catalog: Sequence[Backup]) -> list[datetime]:
    """When each scheduled backup with a good copy (complete, not known damaged) finished,
    oldest first: what the RPO is measured on, by the report, its charts and the status page.
    A backup found damaged everywhere protects nothing, so it closes no gap."""
    return sorted(b.manifest.finished_at for b in catalog
                  if b.manifest is not None and b.manifest.kind == "scheduled" and b.good_copies)


def backup_gaps(times: Sequence[datetime], since: datetime, now: datetime
                ) -> list[tuple[datetime, float]]:
    """(when it ended, seconds) for each gap between consecutive ``times`` that ends after
    ``since`` (the first may have begun before it: it is this period's exposure too), and
    the gap still open ``now``."""
    gaps = [(after, (after - before).total_seconds())
            for before, after in itertools.pairwise(times) if after >= since]
    if times:
        gaps.append((now, (now - times[-1]).total_seconds()))
    return gaps


def rto_verdict(period_drills: Sequence[Mapping[str, Any]], objective: float
                ) -> tuple[bool, dict[str, Any] | None]:
    """Whether the RTO is met, and the drill that says so: the newest of the period, which
    must have passed within ``objective`` seconds (what the school can count on today; an
    older drill's success does not outweigh a newer failure)."""
    dated = [(at, d) for d in period_drills if (at := parse_time(d.get("started_at")))]
    if not dated:
        return False, None
    at, newest = max(dated, key=lambda pair: pair[0])
    seconds = float(newest.get("recovery_seconds") or 0)
    shown = {"at": at.isoformat(), "ok": bool(newest.get("ok")), "recovery_seconds": seconds,
             "backup_id": newest.get("backup_id"), "target": newest.get("target")}
    return bool(newest.get("ok")) and seconds <= objective, shown


def report(ctx: Context, days: int, now: datetime | None = None,
           scanned: tuple[Sequence[Backup], Mapping[str, str]] | None = None) -> dict[str, Any]:
    """A summary of the last ``days`` days: runs, sizes, drills, RPO/RTO, storage and cost.
    ``scanned``: the (backups, unreachable targets) of a scan already made, as for
    :func:`health` (the HTML report draws its charts from the same scan).

    Raises:
        StorageError: every target failed to list.
    """
    now = now or datetime.now(UTC)
    since = now - timedelta(days=days)
    mon = ctx.config.monitoring
    period_runs = [r for r in runs(ctx.config.state_dir)
                   if (t := parse_time(r.get("time"))) is not None and t >= since]
    backups_made = [r for r in period_runs if r.get("kind") == "backup"]
    unreachable: Mapping[str, str]
    if scanned is None:
        found: dict[str, str] = {}
        catalog: Sequence[Backup] = ctx.scan(ctx.targets(), unreachable=found)
        unreachable = found
    else:
        catalog, unreachable = scanned
    in_period = [b for b in catalog if b.manifest and b.manifest.finished_at >= since
                 and b.manifest.kind == "scheduled"]
    gaps = [seconds for _, seconds in backup_gaps(restorable_times(catalog), since, now)]
    tried = [d for d in drill_records(ctx.config.state_dir)
             if (t := parse_time(d.get("started_at"))) is not None and t >= since]
    period_drills = [d for d in tried if d.get("outcome") != "not_run"]
    recovery = [float(d.get("recovery_seconds") or 0) for d in period_drills if d.get("ok")]
    rto = parse_duration(ctx.config.drill.rto_objective).total_seconds()
    rto_met, last_drill = rto_verdict(period_drills, rto)
    storage: list[dict[str, Any]] = []
    for target in ctx.targets():
        size = sum(o.size for b in catalog for c in b.copies if c.target.name == target.name
                   for o in c.objects)
        price = next((t.price_per_gb_month for t in ctx.config.targets if t.name == target.name),
                     None)
        storage.append({"target": target.name, "bytes": size,
                        "monthly_cost": round(size / 1e9 * price, 2) if price is not None
                        else None, "unreachable": unreachable.get(target.name)})
    costs = [float(s["monthly_cost"]) for s in storage if s["monthly_cost"] is not None]
    return {
        "period_days": days, "from": since.isoformat(), "to": now.isoformat(),
        "backups": {
            "runs": len(backups_made),
            "success": sum(1 for r in backups_made if r.get("outcome") == "success"),
            "partial": sum(1 for r in backups_made if r.get("outcome") == "partial"),
            "failure": sum(1 for r in backups_made if r.get("outcome") == "failure"),
            "failures": [{"time": r.get("time"), "error": r.get("error")}
                         for r in backups_made if r.get("outcome") == "failure"],
            "sizes": [{"id": b.id, "bytes": b.manifest.size_bytes} for b in in_period
                      if b.manifest],
            "with_warnings": [{"id": b.id, "warnings": b.manifest.warnings,
                               "suspect": b.suspect} for b in in_period
                              if b.manifest and (b.manifest.warnings or b.suspect)],
        },
        "rpo": {"objective_seconds": parse_duration(mon.max_backup_age).total_seconds(),
                "largest_gap_seconds": max(gaps) if gaps else None,
                "met": bool(gaps) and max(gaps) <= parse_duration(mon.max_backup_age)
                .total_seconds()},
        "drills": {"runs": len(period_drills),
                   "passed": sum(1 for d in period_drills if d.get("ok")),
                   "failed": sum(1 for d in period_drills if not d.get("ok")),
                   "not_run": len(tried) - len(period_drills),
                   "recovery_seconds": {"min": min(recovery), "median": statistics.median(
                       recovery), "max": max(recovery)} if recovery else None},
        "rto": {"objective_seconds": rto, "met": rto_met, "last_drill": last_drill},
        "storage": storage,
        "damaged": damaged_copies(catalog),
        "monthly_cost": round(sum(costs), 2) if costs else None,
        "currency": mon.currency,
    }
