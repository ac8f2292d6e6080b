"""Retention: a pure planner from (backups, policy, now) to keep/delete, with a reason each.

No I/O here: the caller lists the target, calls :func:`plan`, and deletes what it says.

Definitions (UTC throughout, from the backup id's timestamp):

- A backup's *hour* is its UTC date and hour (``2026-12-05T14``: 14:00:00 to 14:59:59); its
  *day* its UTC date; its *week* the ISO 8601 week (``2026-W48``: Monday to
  Sunday, and the ISO week-numbering year, so 2027-01-01 may belong to ``2026-W53``); its
  *month* ``2026-11``; its *year* ``2026``.
- A period is *represented* by its **oldest** complete scheduled backup. The first backup of a
  month stays that month's backup for good, so a monthly or yearly tier (cold storage) gets one
  new backup per period and never one it would delete the next day, which is what choosing the
  newest would cause (it changes every day of the month). Safety backups (taken just before a
  restore) never represent a period.
- A *damaged* copy (found bad by a verify, drill or restore: ``state.checks``; or a backup
  whose uploads were suspect: empty or shrunken) represents a period only when the period
  has no good one; likewise ``keep_last`` and ``min_keep`` count
  good backups first and fall back to damaged ones only when there are too few good ones.
- ``keep_daily = N`` keeps the representatives of the newest N days *that have a backup*
  (likewise hours, weeks, months, years), so when backups stop, retention never runs out of
  days and deletes the last good ones. ``-1`` keeps every period. An hourly backup at 00:00
  is the first of its hour and of its day: it represents both.
- ``keep_last = N``: the N newest complete backups. ``keep_within``: every complete backup
  younger than the duration. ``min_keep``: the newest ``min_keep`` complete backups, always.
- Always kept, whatever the policy: the newest complete backup, the newest good one, any
  backup in ``protected`` (the newest one whose copy on this target passed a verify or drill),
  safety backups younger than ``safety_keep_within`` (the only copy of the state a restore
  replaced), and incomplete backups less than a day old (a run may still be writing them).
  Incomplete backups older than that are deleted.
- An empty policy keeps every complete backup (old incomplete leftovers still go).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conexa_backup.durations import human_duration, parse_duration
from conexa_backup.manifest import ID_FORMAT, id_sort_key

LEFTOVER_AGE = timedelta(days=1)
ALL = -1


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    keep_within: timedelta | None = None
    min_keep: int = 1
    safety_keep_within: timedelta = timedelta(days=7)

    @property
    def period_tier(self) -> bool:
        """Only weekly/monthly/yearly rules: an archive tier that wants one backup a period.

        A tier with hourly or daily rules keeps recent backups: it is sent every one."""
        return (not self.empty and self.keep_last is None and self.keep_within is None
                and self.keep_hourly in (None, 0) and self.keep_daily in (None, 0))

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.keep_last, self.keep_hourly, self.keep_daily,
                                       self.keep_weekly, self.keep_monthly, self.keep_yearly,
                                       self.keep_within))


@dataclass(frozen=True)
class Candidate:
    """What the planner knows of one backup on one target."""

    id: str
    complete: bool
    kind: str = "scheduled"
    damaged: bool = False  # found bad by a verify, drill or restore, or its uploads suspect

    @property
    def time(self) -> datetime:
        return id_time(self.id)


@dataclass
class Decision:
    id: str
    keep: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        verdict = "kept" if self.keep else "deleted"
        return f"{verdict}: {'; '.join(self.reasons)}"


def id_time(backup_id: str) -> datetime:
    """The UTC time a backup id names."""
    return datetime.strptime(backup_id.split("-")[0], ID_FORMAT).replace(tzinfo=UTC)


# Each key sorts as its period does (string order is time order), newest last.
PERIODS: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%dT%H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}",
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def _period_keeps(backups: Sequence[Candidate], rule: str, count: int | None) -> dict[str, str]:
    """id -> "daily 2026-11-29" (or "hourly 2026-11-29T14") for the representatives kept by
    one period rule."""
    if count is None or count == 0:
        return {}
    key_of = PERIODS[rule]
    first: dict[str, Candidate] = {}
    for b in sorted(backups, key=lambda b: id_sort_key(b.id)):  # oldest first: it stays
        held = first.setdefault(key_of(b.time), b)
        if held.damaged and not b.damaged:  # a good one represents the period if any does
            first[key_of(b.time)] = b
    newest_periods = sorted(first, reverse=True)
    chosen = newest_periods if count == ALL else newest_periods[:count]
    return {first[p].id: f"{rule} {p}" + (" (damaged, no good backup that period)"
                                            if first[p].damaged else "") for p in chosen}


def _good_first(backups: Iterable[Candidate]) -> list[Candidate]:
    """Newest first, good backups before damaged ones: who fills the keep_last and min_keep
    places."""
    return sorted(_newest_first(backups), key=lambda b: b.damaged)


def retaining_rules(backups: Sequence[Candidate], policy: Policy,
                    now: datetime) -> dict[str, list[str]]:
    """id -> the policy rules (not the safety floors) that keep it, for complete backups."""
    complete = [b for b in backups if b.complete and b.time <= now]
    ranked = _good_first(complete)
    kept: dict[str, list[str]] = {}

    def add(ids: Iterable[str], reason: Callable[[str], str]) -> None:
        for backup_id in ids:
            kept.setdefault(backup_id, []).append(reason(backup_id))

    if policy.keep_last:
        add((b.id for b in ranked[:policy.keep_last]), lambda _: f"last {policy.keep_last}")
    if policy.keep_within is not None:
        within = policy.keep_within
        add((b.id for b in complete if now - b.time <= within),
            lambda _: f"within {human_duration(within)}")
    scheduled = [b for b in complete if b.kind != "safety"]
    for rule in PERIODS:
        reps = _period_keeps(scheduled, rule, getattr(policy, f"keep_{rule}"))
        add(reps, reps.__getitem__)
    return kept


NEWEST = "newest complete backup"
NEWEST_GOOD = "newest good backup"
NEWEST_VERIFIED = "newest verified backup"


@dataclass(frozen=True)
class Floors:
    """What one target always keeps, whatever its policy: the newest complete backup, the
    newest good one (when the newest is damaged) and the newest verified one. Prune's plan and
    a manual delete (``actions.prune.must_keep``) both use these; nothing else decides them."""

    newest: str | None
    newest_good: str | None
    verified: frozenset[str]

    def reasons(self, backup_id: str) -> list[str]:
        """Why ``backup_id`` is always kept (empty: no floor holds it)."""
        return ([NEWEST] if backup_id == self.newest else []) + \
            ([NEWEST_GOOD] if backup_id == self.newest_good != self.newest else []) + \
            ([NEWEST_VERIFIED] if backup_id in self.verified else [])


def floors(backups: Iterable[Candidate], protected: Iterable[str] = ()) -> Floors:
    """The :class:`Floors` of one target's backups; ``protected``: the ids whose copy here
    passed a verify or drill last (``state.Checks.newest_passed``)."""
    complete = _newest_first(b for b in backups if b.complete)
    return Floors(complete[0].id if complete else None,
                  next((b.id for b in complete if not b.damaged), None), frozenset(protected))


def plan(backups: Sequence[Candidate], policy: Policy, now: datetime,
         protected: Iterable[str] = ()) -> list[Decision]:
    """Decide, for every backup of one target, whether it stays; newest first."""
    always = floors(backups, protected)
    rules = retaining_rules(backups, policy, now)
    complete = _newest_first(b for b in backups if b.complete)
    floor = {b.id for b in _good_first(complete)[:max(policy.min_keep, 0)]}
    decisions = []
    for b in _newest_first(backups):
        reasons = list(rules.get(b.id, []))
        if not b.complete:
            young = now - b.time < LEFTOVER_AGE
            decisions.append(Decision(b.id, young, [
                "incomplete, less than a day old (a run may be in progress)" if young
                else "incomplete leftover older than a day"]))
            continue
        if b.time > now:
            reasons.append("newer than the evaluation time")
        held = always.reasons(b.id)
        reasons += [r for r in held if r != NEWEST_VERIFIED]
        if b.id in floor:
            reasons.append(f"min_keep {policy.min_keep}")
        reasons += [r for r in held if r == NEWEST_VERIFIED]
        if _young_safety(b, policy, now):
            reasons.append(f"safety backup, kept {human_duration(policy.safety_keep_within)}")
        if policy.empty:
            reasons.append("no retention policy")
        decisions.append(Decision(b.id, bool(reasons), reasons or [_why_not(b, policy)]))
    return decisions


def would_retain(existing: Sequence[Candidate], new: Candidate, policy: Policy) -> bool:
    """Would ``policy`` keep ``new`` by its own rules (not by the safety floors)?

    Used to skip uploading a backup to a tier that would only delete it again: the first
    backup of the month goes to a monthly tier, the others do not.
    """
    if policy.empty:
        return True
    return new.id in retaining_rules([*existing, new], policy, new.time)


def _young_safety(b: Candidate, policy: Policy, now: datetime) -> bool:
    return b.kind == "safety" and now - b.time <= policy.safety_keep_within


def _why_not(b: Candidate, policy: Policy) -> str:
    rules = [f"keep_{r}" for r in PERIODS if getattr(policy, f"keep_{r}") not in (None, 0)]
    if policy.keep_last:
        rules.append("keep_last")
    if policy.keep_within is not None:
        rules.append("keep_within")
    return "beyond " + ", ".join(rules) if rules else "no rule keeps it"


def _newest_first(backups: Iterable[Candidate]) -> list[Candidate]:
    return sorted(backups, key=lambda b: id_sort_key(b.id), reverse=True)



Count = int | None


class RetentionConfig(BaseModel):
    """``[retention]`` (the default) or a target's ``retention = {...}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_last: int | None = Field(default=None, ge=1)
    keep_hourly: Count = None
    keep_daily: Count = None
    keep_weekly: Count = None
    keep_monthly: Count = None
    keep_yearly: Count = None
    keep_within: str | None = None
    min_keep: int = Field(default=1, ge=0)
    prune_after_backup: bool = True
    # Safety backups (taken before an in-place restore) represent no period: they are the
    # only copy of the state a restore replaced, so they stay this long whatever the rules say.
    safety_keep_within: str = "7d"

    @field_validator("keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                     mode="before")
    @classmethod
    def _all(cls, value: object) -> object:
        if value == "all" or (isinstance(value, int) and not isinstance(value, bool)
                              and value < 0):
            return ALL
        return value

    @field_validator("keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                     mode="after")
    @classmethod
    def _negative_is_all(cls, value: int | None) -> int | None:
        # "-3" from a ${VAR}, or -3.0: every negative means "keep every period".
        return ALL if value is not None and value < 0 else value

    @field_validator("keep_within", "safety_keep_within")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    def policy(self) -> Policy:
        return Policy(
            keep_last=self.keep_last, keep_hourly=self.keep_hourly, keep_daily=self.keep_daily,
            keep_weekly=self.keep_weekly, keep_monthly=self.keep_monthly,
            keep_yearly=self.keep_yearly,
            keep_within=parse_duration(self.keep_within) if self.keep_within else None,
            min_keep=self.min_keep,
            safety_keep_within=parse_duration(self.safety_keep_within),
        )
