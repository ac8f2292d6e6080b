"""Retention, the pure planner: property tests against a brute-force GFS, the seed's tiers.

Everything here is in memory and fast: backup histories are lists of :class:`Candidate`, and
the expected decisions come from an independent, deliberately naive implementation of the
definition in the README ("Retention") written below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from conexa_backup.config import parse_config
from conexa_backup.errors import ConfigError
from conexa_backup.retention import (
    PERIODS,
    Candidate,
    Decision,
    Policy,
    RetentionConfig,
    id_time,
    parse_duration,
    plan,
    retaining_rules,
    would_retain,
)

FMT = "%Y%m%dT%H%M%SZ"
DAY = timedelta(days=1)
# The reasons the planner gives for keeping a backup whatever the policy says.
FLOOR_REASONS = ("newest complete backup", "newest good backup", "min_keep ",
                 "newest verified backup", "newer than the evaluation time", "safety backup, kept")


def bid(t: datetime) -> str:
    return t.strftime(FMT)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- an independent implementation of the documented definition --------------------------------

def _period_key(rule: str, t: datetime) -> object:
    d = t.date()
    if rule == "hourly":
        return (d, t.hour)
    if rule == "daily":
        return d
    if rule == "weekly":
        iso = d.isocalendar()
        return (iso.year, iso.week)
    if rule == "monthly":
        return (d.year, d.month)
    return d.year


@dataclass
class Expected:
    by_rules: set[str]  # complete backups some policy rule keeps (not the safety floors)
    kept: set[str]  # everything that must stay


def brute_force(backups: Sequence[Candidate], policy: Policy, now: datetime,
                protected: Iterable[str] = ()) -> Expected:
    """The README's definition, spelled out the slow and obvious way.

    Ids here are plain timestamps (no ``-N`` suffix), so time order is id order.
    """
    young_leftovers = {b.id for b in backups if not b.complete and now - id_time(b.id) < DAY}
    if policy.empty:  # every complete backup stays; old incomplete leftovers still go
        return Expected(set(), {b.id for b in backups if b.complete} | young_leftovers)
    complete = sorted((b for b in backups if b.complete), key=lambda b: id_time(b.id))
    complete_ids = {b.id for b in complete}
    newest_first = list(reversed(complete))
    good = [b for b in newest_first if not b.damaged]
    # keep_last and min_keep places: good backups first, damaged ones only to fill up.
    ranked = good + [b for b in newest_first if b.damaged]
    by_rules: set[str] = set()
    if policy.keep_last:
        by_rules |= {b.id for b in ranked[:policy.keep_last]}
    if policy.keep_within is not None:
        by_rules |= {b.id for b in complete if now - id_time(b.id) <= policy.keep_within}
    scheduled = [b for b in complete if b.kind != "safety"]
    for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
        count = getattr(policy, f"keep_{rule}")
        if not count:
            continue
        groups: dict[object, list[Candidate]] = {}
        for b in scheduled:
            groups.setdefault(_period_key(rule, id_time(b.id)), []).append(b)
        # The oldest good one; the oldest damaged one only where the period has no good one.
        reps = [min(members, key=lambda b: (b.damaged, id_time(b.id)))
                for members in groups.values()]
        reps.sort(key=lambda b: id_time(b.id), reverse=True)  # the newest period first
        chosen = reps if count == -1 else reps[:count]
        by_rules |= {b.id for b in chosen}
    kept = set(by_rules)
    kept |= {b.id for b in ranked[:max(policy.min_keep, 0)]}
    kept |= {b.id for b in newest_first[:1]}
    kept |= {b.id for b in good[:1]}
    kept |= {b.id for b in complete
             if b.kind == "safety" and now - id_time(b.id) <= policy.safety_keep_within}
    kept |= set(protected) & complete_ids
    kept |= {b.id for b in backups if not b.complete and now - id_time(b.id) < DAY}
    return Expected(by_rules, kept)


def kept_ids(decisions: Sequence[Decision]) -> set[str]:
    return {d.id for d in decisions if d.keep}


# -- strategies ------------------------------------------------------------------------------

START = utc(2024, 1, 1).replace(tzinfo=None)
END = utc(2026, 12, 31, 23, 59, 59).replace(tzinfo=None)
# Half the backups fall in two busy months, so that days, weeks and months hold several.
BUSY_START = utc(2026, 10, 20).replace(tzinfo=None)
BUSY_END = utc(2026, 12, 10).replace(tzinfo=None)
# And some in two busy days, so that hours hold several too (an hourly schedule).
BUSY_HOURS_START = utc(2026, 12, 4, 22).replace(tzinfo=None)
BUSY_HOURS_END = utc(2026, 12, 6, 2).replace(tzinfo=None)

times = st.one_of(
    st.datetimes(min_value=START, max_value=END),
    st.datetimes(min_value=BUSY_START, max_value=BUSY_END),
    st.datetimes(min_value=BUSY_HOURS_START, max_value=BUSY_HOURS_END),
).map(lambda t: t.replace(microsecond=0, tzinfo=UTC))

backup = st.tuples(
    times,
    st.sampled_from([True, True, True, True, False]),  # complete
    st.sampled_from(["scheduled"] * 6 + ["safety"]),
    st.sampled_from([False, False, True]),  # found damaged by a verify, drill or restore
)

# Mixed good and damaged histories: a third of the complete copies are known damaged.
histories = st.lists(backup, max_size=40, unique_by=lambda b: bid(b[0])).map(
    lambda items: [Candidate(bid(t), complete, kind, complete and damaged)
                   for t, complete, kind, damaged in items])

counts = st.one_of(st.none(), st.integers(0, 15), st.just(-1))
durations = st.one_of(
    st.none(),
    st.sampled_from([timedelta(days=30), timedelta(days=7), timedelta(hours=12),
                     timedelta(minutes=90), timedelta(weeks=2)]),
    st.integers(1, 60 * 24 * 500).map(lambda m: timedelta(minutes=m)),
)
policies = st.builds(
    Policy,
    keep_last=st.one_of(st.none(), st.integers(1, 10)),
    keep_hourly=counts, keep_daily=counts, keep_weekly=counts, keep_monthly=counts,
    keep_yearly=counts,
    keep_within=durations,
    min_keep=st.integers(0, 5),
    safety_keep_within=st.sampled_from([timedelta(days=7), timedelta(hours=1),
                                        timedelta(days=60)]),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Candidate], Policy, datetime, list[str]]:
    history = draw(histories)
    policy = draw(policies)
    latest = max((id_time(b.id) for b in history), default=utc(2026, 11, 30))
    after = draw(st.one_of(
        st.just(timedelta(0)),
        st.integers(0, 3 * 24 * 3600).map(lambda s: timedelta(seconds=s)),
        st.integers(0, 400).map(lambda d: timedelta(days=d)),
    ))
    protected = draw(st.one_of(st.just([]),
                               st.sampled_from(history).map(lambda b: [b.id]) if history
                               else st.just([])))
    return history, policy, latest + after, protected


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# -- properties ------------------------------------------------------------------------------

@SETTINGS
@given(scenarios())
def test_newest_complete_newest_good_and_min_keep_always_kept(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    kept = kept_ids(plan(history, policy, now, protected))
    newest_first = sorted((b.id for b in history if b.complete), reverse=True)
    good = sorted((b.id for b in history if b.complete and not b.damaged), reverse=True)
    if newest_first:
        assert newest_first[0] in kept
    if good:  # the newest backup that can be restored, whatever damaged ones came after
        assert good[0] in kept
    # min_keep counts good backups first; damaged ones fill it only when too few are good.
    ranked = good + [i for i in newest_first if i not in good]
    assert set(ranked[:policy.min_keep]) <= kept
    assert set(protected) & set(newest_first) <= kept


@SETTINGS
@given(scenarios())
def test_a_damaged_backup_never_represents_a_period_that_has_a_good_one(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    scheduled_good = [b for b in history if b.complete and not b.damaged and b.kind != "safety"]
    for d in plan(history, policy, now, protected):
        b = next(c for c in history if c.id == d.id)
        for reason in d.reasons:
            rule, _, period = reason.partition(" ")
            if rule not in PERIODS:
                continue
            period = period.split(" ")[0]
            rivals = [g for g in scheduled_good if PERIODS[rule](g.time) == period]
            assert not (b.damaged and rivals), (d.reason, [g.id for g in rivals])
            assert b.damaged == ("damaged" in reason), reason


@SETTINGS
@given(scenarios())
def test_safety_backups_stay_for_safety_keep_within(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    kept = kept_ids(plan(history, policy, now, protected))
    for b in history:
        if b.complete and b.kind == "safety" and now - b.time <= policy.safety_keep_within:
            assert b.id in kept


def test_the_day_is_represented_by_the_backup_whose_drill_passed() -> None:
    """The trial: two backups on one day, the first one's drill failed, the second one's
    passed; a keep_daily tier kept the failed one and deleted the good one."""
    failed = Candidate("20261201T010000Z", True, damaged=True)
    passed = Candidate("20261201T130000Z", True)
    later = Candidate("20261202T010000Z", True)
    decisions = {d.id: d for d in plan([failed, passed, later], Policy(keep_daily=7),
                                       utc(2026, 12, 2, 2), protected=[passed.id])}
    assert decisions[passed.id].keep and "daily 2026-12-01" in decisions[passed.id].reasons
    assert not decisions[failed.id].keep, decisions[failed.id].reason
    # Without the record of the failed drill, the first backup of the day represents it.
    plain = {d.id: d.keep for d in plan([Candidate(failed.id, True), passed, later],
                                        Policy(keep_daily=7), utc(2026, 12, 2, 2))}
    assert plain == {failed.id: True, passed.id: False, later.id: True}


def test_a_damaged_backup_represents_its_period_only_without_a_good_one() -> None:
    damaged = Candidate("20261201T010000Z", True, damaged=True)
    newer = Candidate("20261202T010000Z", True)
    decisions = {d.id: d for d in plan([damaged, newer], Policy(keep_daily=7),
                                       utc(2026, 12, 2, 2))}
    assert decisions[damaged.id].reason == \
        "kept: daily 2026-12-01 (damaged, no good backup that period)"


def test_the_newest_good_backup_stays_when_newer_ones_are_damaged() -> None:
    good = Candidate("20261201T010000Z", True)
    bad = [Candidate(f"202612{d:02d}T010000Z", True, damaged=True) for d in (2, 3, 4)]
    decisions = {d.id: d for d in plan([good, *bad], Policy(keep_last=2), utc(2026, 12, 4, 2))}
    assert decisions[good.id].reason == "kept: last 2; newest good backup; min_keep 1"
    # keep_last counts the good one first; the newest complete backup is always kept.
    assert decisions[bad[-1].id].reason == "kept: last 2; newest complete backup"
    assert not decisions[bad[0].id].keep and not decisions[bad[1].id].keep


def test_safety_backup_outlives_a_keep_last_one_policy() -> None:
    """Taken before an in-place restore, then a backup and its prune: the safety backup
    represents no period, but it is the only copy of the state the restore replaced."""
    safety = Candidate("20261201T100000Z", True, "safety")
    after = Candidate("20261201T110000Z", True)
    policy = RetentionConfig(keep_last=1).policy()
    assert policy.safety_keep_within == timedelta(days=7)
    decisions = {d.id: d for d in plan([safety, after], policy, utc(2026, 12, 1, 11))}
    assert decisions[safety.id].reason == "kept: safety backup, kept 7d"
    later = {d.id: d.keep for d in plan([safety, after], policy, utc(2026, 12, 8, 11))}
    assert later == {safety.id: False, after.id: True}
    short = RetentionConfig(keep_last=1, safety_keep_within="1h").policy()
    assert not next(d for d in plan([safety, after], short, utc(2026, 12, 1, 12))
                    if d.id == safety.id).keep


@SETTINGS
@given(scenarios())
def test_plan_is_idempotent(case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    kept = kept_ids(plan(history, policy, now, protected))
    remaining = [b for b in history if b.id in kept]
    again = plan(remaining, policy, now, protected)
    assert [d.id for d in again if not d.keep] == []


@SETTINGS
@given(scenarios())
def test_plan_matches_the_brute_force_definition(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    decisions = plan(history, policy, now, protected)
    expected = brute_force(history, policy, now, protected)
    assert kept_ids(decisions) == expected.kept
    if not policy.empty:
        assert set(retaining_rules(history, policy, now)) == expected.by_rules


@SETTINGS
@given(scenarios())
def test_one_decision_per_backup_with_a_reason(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    decisions = plan(history, policy, now, protected)
    assert sorted(d.id for d in decisions) == sorted(b.id for b in history)
    assert [d.id for d in decisions] == sorted((b.id for b in history), reverse=True)
    for d in decisions:
        verdict, sep, why = d.reason.partition(": ")
        assert sep and why.strip(), d.reason
        assert verdict == ("kept" if d.keep else "deleted")
        assert all(r.strip() for r in d.reasons)


@SETTINGS
@given(scenarios())
def test_incomplete_backups_kept_only_while_younger_than_a_day(
        case: tuple[list[Candidate], Policy, datetime, list[str]]) -> None:
    history, policy, now, protected = case
    decisions = {d.id: d for d in plan(history, policy, now, protected)}
    for b in history:
        if not b.complete:
            assert decisions[b.id].keep == (now - id_time(b.id) < DAY), decisions[b.id].reason
            assert "incomplete" in decisions[b.id].reason


@SETTINGS
@given(histories, st.integers(0, 5))
def test_an_empty_policy_keeps_every_complete_backup(history: list[Candidate],
                                                     min_keep: int) -> None:
    now = max((id_time(b.id) for b in history), default=utc(2026, 1, 1)) + 400 * DAY
    decisions = {d.id: d for d in plan(history, Policy(min_keep=min_keep), now)}
    assert len(decisions) == len(history)
    for b in history:  # leftovers are 400 days old here: they go even without a policy
        assert decisions[b.id].keep == b.complete
        assert decisions[b.id].reason.startswith("kept:" if b.complete else "deleted:")


@st.composite
def uploads(draw: st.DrawFn) -> tuple[list[Candidate], Candidate, Policy]:
    history = draw(histories)
    policy = draw(policies)
    latest = max((id_time(b.id) for b in history), default=utc(2026, 11, 1))
    gap = draw(st.one_of(st.integers(1, 3600), st.integers(1, 90 * 24 * 3600)))
    kind = draw(st.sampled_from(["scheduled", "scheduled", "safety"]))
    return history, Candidate(bid(latest + timedelta(seconds=gap)), True, kind), policy


@SETTINGS
@given(uploads())
def test_would_retain_agrees_with_the_plan(case: tuple[list[Candidate], Candidate, Policy]) \
        -> None:
    existing, new, policy = case
    answer = would_retain(existing, new, policy)
    if policy.empty:
        assert answer
        return
    assert answer == (new.id in retaining_rules([*existing, new], policy, new.time))
    assert answer == (new.id in brute_force([*existing, new], policy, new.time).by_rules)
    # In the plan made right then, the new backup is kept by a policy rule exactly when
    # would_retain said so (the safety floors keep it anyway: it is the newest).
    decision = next(d for d in plan([*existing, new], policy, new.time) if d.id == new.id)
    assert decision.keep
    rules = [r for r in decision.reasons if not r.startswith(FLOOR_REASONS)]
    assert bool(rules) == answer, decision.reason


@SETTINGS
@given(histories, st.integers(1, 12) | st.just(-1), st.integers(0, 5),
       st.integers(0, 27), st.integers(1, 2 * 24 * 3600))
def test_would_retain_never_for_a_monthly_tier_whose_month_has_a_backup(
        history: list[Candidate], monthly: int, min_keep: int, day: int, gap: int) -> None:
    first = utc(2026, 11, 1) + timedelta(days=day)  # in the busy window of the histories
    older = Candidate(bid(first), True)
    new = Candidate(bid(first + timedelta(seconds=gap)), True)
    assert new.time.month == older.time.month
    history = [b for b in history if b.id not in (older.id, new.id)]
    policy = Policy(keep_monthly=monthly, min_keep=min_keep)
    # Whatever else is on the tier (complete or not, older or newer, safety or not)...
    assert not would_retain([*history, older], new, policy)
    assert not would_retain([*history, older], Candidate(new.id, True, "safety"), policy)
    # ... while the month's first backup itself was wanted, if nothing scheduled, complete
    # and good came before it that month (a damaged backup does not take the month).
    before = [b for b in history if id_time(b.id) < first]
    month_taken = any(b.complete and not b.damaged and b.kind != "safety"
                      and b.id[:6] == older.id[:6] for b in before)
    assert would_retain(before, older, policy) == (not month_taken)


def test_a_safety_backup_does_not_make_the_month_taken() -> None:
    safety = Candidate("20270302T100000Z", True, "safety")
    new = Candidate("20270303T000000Z", True)
    assert would_retain([safety], new, Policy(keep_monthly=12))
    assert not would_retain([new], Candidate("20270304T000000Z", True, "safety"),
                            Policy(keep_monthly=12))


def test_same_second_suffixes_order_numerically() -> None:
    ids = ["20261130T000000Z-10", "20261130T000000Z-9", "20261130T000000Z",
           "20261130T000000Z-1"]
    now = utc(2026, 11, 30, 1)
    decisions = plan([Candidate(i, True) for i in ids], Policy(keep_daily=1, min_keep=0), now)
    assert [d.id for d in decisions] == ["20261130T000000Z-10", "20261130T000000Z-9",
                                         "20261130T000000Z-1", "20261130T000000Z"]
    assert kept_ids(decisions) == {"20261130T000000Z", "20261130T000000Z-10"}
    assert next(d for d in decisions if d.id == "20261130T000000Z").reason == \
        "kept: daily 2026-11-30"


# -- the seed's tiers over a year of daily backups ---------------------------------------------

YEAR = [utc(2025, 12, 1) + n * DAY for n in range((date(2026, 11, 30) - date(2025, 12, 1)).days
                                                   + 1)]
YEAR_IDS = [bid(t) for t in YEAR]
NOW = utc(2026, 11, 30, 12)


def _year_plan(policy: Policy, now: datetime = NOW) -> dict[str, Decision]:
    return {d.id: d for d in plan([Candidate(i, True) for i in YEAR_IDS], policy, now)}


def _ids(*days: str) -> set[str]:
    return {d.replace("-", "") + "T000000Z" for d in days}


def test_a_year_of_daily_backups_is_what_was_generated() -> None:
    assert len(YEAR_IDS) == 365
    assert YEAR_IDS[0] == "20251201T000000Z" and YEAR_IDS[-1] == "20261130T000000Z"


def test_local_tier_keeps_the_seven_newest_days() -> None:
    decisions = _year_plan(RetentionConfig(keep_daily=7).policy())
    assert {i for i, d in decisions.items() if d.keep} == _ids(
        "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-28", "2026-11-29",
        "2026-11-30")
    assert decisions["20261129T000000Z"].reason == "kept: daily 2026-11-29"
    assert decisions["20261130T000000Z"].reason == \
        "kept: daily 2026-11-30; newest complete backup; min_keep 1"
    assert decisions["20261123T000000Z"].reason == "deleted: beyond keep_daily"
    assert decisions["20251201T000000Z"].reason == "deleted: beyond keep_daily"


def test_s3_tier_keeps_seven_days_and_four_mondays() -> None:
    decisions = _year_plan(RetentionConfig(keep_daily=7, keep_weekly=4).policy())
    assert {i for i, d in decisions.items() if d.keep} == _ids(
        "2026-11-09", "2026-11-16", "2026-11-23",  # Mondays of 2026-W46, W47, W48
        "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-28", "2026-11-29",
        "2026-11-30")  # the seven days; Nov 30 is also the Monday of 2026-W49
    assert decisions["20261109T000000Z"].reason == "kept: weekly 2026-W46"
    assert decisions["20261123T000000Z"].reason == "kept: weekly 2026-W48"
    assert decisions["20261130T000000Z"].reason == \
        "kept: daily 2026-11-30; weekly 2026-W49; newest complete backup; min_keep 1"
    assert decisions["20261124T000000Z"].reason == "kept: daily 2026-11-24"
    assert decisions["20261102T000000Z"].reason == "deleted: beyond keep_daily, keep_weekly"
    assert decisions["20261122T000000Z"].reason == "deleted: beyond keep_daily, keep_weekly"


def test_gcs_tier_keeps_the_first_of_each_month_and_year() -> None:
    decisions = _year_plan(RetentionConfig(keep_monthly=12, keep_yearly="all").policy())
    firsts = {i for i in YEAR_IDS if i[6:8] == "01"}
    assert len(firsts) == 12
    assert {i for i, d in decisions.items() if d.keep} == firsts | {"20261130T000000Z"}
    assert decisions["20251201T000000Z"].reason == "kept: monthly 2025-12; yearly 2025"
    assert decisions["20260101T000000Z"].reason == "kept: monthly 2026-01; yearly 2026"
    assert decisions["20261101T000000Z"].reason == "kept: monthly 2026-11"
    # The newest is kept only by the safety floor, not as November's backup.
    assert decisions["20261130T000000Z"].reason == "kept: newest complete backup; min_keep 1"
    assert decisions["20261102T000000Z"].reason == "deleted: beyond keep_monthly, keep_yearly"
    # Thirteen months on, December 2025 leaves the monthly window but stays as 2025's backup.
    later = [*YEAR_IDS, "20261201T000000Z"]
    kept = kept_ids(plan([Candidate(i, True) for i in later],
                         RetentionConfig(keep_monthly=12, keep_yearly=-1).policy(),
                         utc(2026, 12, 1, 12)))
    assert "20251201T000000Z" in kept and "20261201T000000Z" in kept


def test_keep_within_thirty_days_at_the_boundary() -> None:
    config = parse_config(
        "[database]\nurl = \"postgresql://x@h/db\"\n"
        "[[targets]]\nname = \"local\"\ntype = \"local\"\npath = \"/b\"\n",
        Path("b.toml"), env={"BACKUP_RETENTION_DAYS": "30"})
    policy = config.retention_for("local").policy()
    assert policy.keep_within == timedelta(days=30)
    policy = Policy(keep_within=policy.keep_within, min_keep=0)

    # now = Nov 30 12:00: Oct 31 00:00 is 30.5 days old, Nov 1 29.5 days.
    decisions = _year_plan(policy)
    kept = {i for i, d in decisions.items() if d.keep}
    assert kept == {i for i in YEAR_IDS if i >= "20261101"}
    assert len(kept) == 30
    assert decisions["20261101T000000Z"].reason == "kept: within 30d"
    assert decisions["20261031T000000Z"].reason == "deleted: beyond keep_within"

    # now = Nov 30 00:00: Oct 31 00:00 is exactly 30 days old, and "younger than" includes it.
    at_boundary = _year_plan(policy, utc(2026, 11, 30))
    assert {i for i, d in at_boundary.items() if d.keep} == \
        {i for i in YEAR_IDS if i >= "20261031"}
    # One second later it goes.
    after = _year_plan(policy, utc(2026, 11, 30, 0, 0, 1))
    assert {i for i, d in after.items() if d.keep} == {i for i in YEAR_IDS if i >= "20261101"}


def test_backups_stopping_do_not_run_retention_out_of_days() -> None:
    """Periods are counted among those that have a backup: a year later, nothing goes."""
    policy = RetentionConfig(keep_daily=7, keep_weekly=4).policy()
    now = utc(2027, 11, 30)
    kept = kept_ids(plan([Candidate(i, True) for i in YEAR_IDS], policy, now))
    assert kept == kept_ids(plan([Candidate(i, True) for i in YEAR_IDS], policy, NOW))


# -- ISO weeks across the new year --------------------------------------------------------------

def test_iso_week_keys_across_the_new_year() -> None:
    week = PERIODS["weekly"]
    assert week(utc(2026, 12, 31)) == "2026-W53"
    assert week(utc(2027, 1, 1)) == "2026-W53"
    assert week(utc(2027, 1, 3, 23, 59, 59)) == "2026-W53"
    assert week(utc(2027, 1, 4)) == "2027-W01"
    assert week(utc(2025, 12, 29)) == "2026-W01"  # ISO year 2026 starts in December 2025
    assert PERIODS["yearly"](utc(2027, 1, 1)) == "2027"  # the yearly rule is the calendar's
    assert PERIODS["monthly"](utc(2027, 1, 1)) == "2027-01"


def test_iso_week_representatives_across_the_new_year() -> None:
    ids = ["20261231T000000Z", "20270101T000000Z", "20270104T000000Z"]
    decisions = {d.id: d for d in plan([Candidate(i, True) for i in ids],
                                       Policy(keep_weekly=-1, min_keep=0), utc(2027, 1, 5))}
    assert decisions["20261231T000000Z"].reason == "kept: weekly 2026-W53"
    assert decisions["20270101T000000Z"].reason == "deleted: beyond keep_weekly"
    assert decisions["20270104T000000Z"].reason == "kept: weekly 2027-W01; newest complete backup"
    yearly = {d.id: d for d in plan([Candidate(i, True) for i in ids],
                                    Policy(keep_yearly=-1, min_keep=0), utc(2027, 1, 5))}
    assert yearly["20270101T000000Z"].reason == "kept: yearly 2027"
    assert yearly["20270104T000000Z"].reason == "kept: newest complete backup"
    assert yearly["20261231T000000Z"].reason == "kept: yearly 2026"


# -- the archive tier: receives the first backup of each month, never deletes one --------------

@pytest.mark.parametrize("start, per_day", [(utc(2026, 10, 1), 1), (utc(2026, 1, 17, 3), 2),
                                            (utc(2026, 11, 20, 23, 30), 1)])
def test_archive_tier_has_zero_churn(start: datetime, per_day: int) -> None:
    policy = RetentionConfig(keep_monthly=12, keep_yearly="all").policy()
    tier: list[Candidate] = []
    received: list[str] = []
    for n in range(90):
        for k in range(per_day):
            t = start + n * DAY + k * timedelta(hours=12 // per_day)
            new = Candidate(bid(t), True)
            if would_retain(tier, new, policy):
                tier.append(new)
                received.append(new.id)
            decisions = plan(tier, policy, t + timedelta(minutes=5))
            assert all(d.keep for d in decisions), [d.reason for d in decisions if not d.keep]
    months = sorted({i[:6] for i in received})
    assert len(received) == len(months)  # one backup per month...
    firsts = {}
    for n in range(90):
        for k in range(per_day):
            t = start + n * DAY + k * timedelta(hours=12 // per_day)
            firsts.setdefault(t.strftime("%Y%m"), bid(t))
    assert received == [firsts[m] for m in months]  # ... the first one the month saw
    assert len(months) >= 3


def test_daily_tier_receives_every_day_but_not_a_second_backup_the_same_day() -> None:
    policy = RetentionConfig(keep_daily=7, keep_weekly=4).policy()
    tier = [Candidate("20261129T000000Z", True)]
    assert would_retain(tier, Candidate("20261130T000000Z", True), policy)
    tier.append(Candidate("20261130T000000Z", True))
    assert not would_retain(tier, Candidate("20261130T120000Z", True), policy)
    assert would_retain(tier, Candidate("20261130T120000Z", True), Policy())


# -- the hourly tier ----------------------------------------------------------------------------

HOUR = timedelta(hours=1)
# Two days and a bit of hourly backups on the hour (00:00 included: the daily cron line).
HOURS = [utc(2026, 12, 4, 0) + n * HOUR for n in range(2 * 24 + 15)]  # to Dec 6 14:00
HOUR_IDS = [bid(t) for t in HOURS]
HOUR_NOW = utc(2026, 12, 6, 14, 30)


def test_hour_keys_are_utc_date_and_hour() -> None:
    hour = PERIODS["hourly"]
    assert hour(utc(2026, 12, 5, 14)) == "2026-12-05T14"
    assert hour(utc(2026, 12, 5, 14, 59, 59)) == "2026-12-05T14"
    assert hour(utc(2026, 12, 5, 15)) == "2026-12-05T15"
    assert hour(utc(2026, 12, 31, 23, 30)) == "2026-12-31T23"
    assert hour(utc(2027, 1, 1, 0, 0, 1)) == "2027-01-01T00"
    # Keys sort as their hours do: the planner takes the newest N by sorting them.
    keys = [hour(t) for t in HOURS]
    assert keys == sorted(keys) and len(set(keys)) == len(HOURS)


def test_hourly_tier_keeps_the_newest_hours_and_the_days() -> None:
    decisions = {d.id: d for d in plan([Candidate(i, True) for i in HOUR_IDS],
                                       RetentionConfig(keep_hourly=24, keep_daily=7).policy(),
                                       HOUR_NOW)}
    newest_24 = set(HOUR_IDS[-24:])  # Dec 5 15:00 to Dec 6 14:00
    midnights = {"20261204T000000Z", "20261205T000000Z", "20261206T000000Z"}
    assert {i for i, d in decisions.items() if d.keep} == newest_24 | midnights
    assert decisions["20261205T150000Z"].reason == "kept: hourly 2026-12-05T15"
    assert decisions["20261205T140000Z"].reason == "deleted: beyond keep_hourly, keep_daily"
    # The backup at 00:00 is the first of its hour and of its day: it represents both.
    assert decisions["20261206T000000Z"].reason == "kept: hourly 2026-12-06T00; daily 2026-12-06"
    assert decisions["20261205T000000Z"].reason == "kept: daily 2026-12-05"
    assert decisions["20261206T140000Z"].reason == \
        "kept: hourly 2026-12-06T14; newest complete backup; min_keep 1"


def test_the_oldest_backup_of_the_hour_represents_it_for_good() -> None:
    """A manual backup at 14:40 does not displace the scheduled one at 14:00, and neither does
    the next one: the hour's backup never changes once taken."""
    first = Candidate("20261205T140000Z", True)
    manual = Candidate("20261205T144000Z", True)
    policy = Policy(keep_hourly=24, min_keep=0)
    decisions = {d.id: d for d in plan([first, manual], policy, utc(2026, 12, 5, 14, 50))}
    assert decisions[first.id].reason == "kept: hourly 2026-12-05T14"
    assert decisions[manual.id].reason == "kept: newest complete backup"
    later = Candidate("20261205T150000Z", True)
    decisions = {d.id: d for d in plan([first, manual, later], policy, utc(2026, 12, 5, 15, 5))}
    assert decisions[first.id].keep and not decisions[manual.id].keep
    assert decisions[manual.id].reason == "deleted: beyond keep_hourly"
    assert not would_retain([first], manual, policy)
    assert would_retain([first, manual], later, policy)


def test_keep_hourly_counts_the_hours_that_have_a_backup() -> None:
    """Backups stopped for a day (a host down): keep_hourly = 3 still keeps three hours, the
    last three that had one, not the three hours before now."""
    ids = ["20261205T080000Z", "20261205T090000Z", "20261205T100000Z", "20261205T110000Z"]
    for now in (utc(2026, 12, 5, 11, 30), utc(2026, 12, 6, 11, 30), utc(2027, 12, 6)):
        decisions = plan([Candidate(i, True) for i in ids], Policy(keep_hourly=3, min_keep=0),
                         now)
        assert kept_ids(decisions) == set(ids[1:]), now
    every = plan([Candidate(i, True) for i in ids], RetentionConfig(keep_hourly="all").policy(),
                 utc(2027, 12, 6))
    assert kept_ids(every) == set(ids)


def test_a_damaged_hour_is_represented_by_its_good_backup() -> None:
    damaged = Candidate("20261205T140000Z", True, damaged=True)
    good = Candidate("20261205T142000Z", True)
    alone = Candidate("20261205T150000Z", True, damaged=True)
    newest = Candidate("20261205T160000Z", True)
    decisions = {d.id: d for d in plan([damaged, good, alone, newest],
                                       Policy(keep_hourly=24, min_keep=0),
                                       utc(2026, 12, 5, 16, 10))}
    assert decisions[good.id].reason == "kept: hourly 2026-12-05T14"
    assert not decisions[damaged.id].keep
    assert decisions[alone.id].reason == \
        "kept: hourly 2026-12-05T15 (damaged, no good backup that period)"


def test_an_hourly_tier_is_sent_every_backup() -> None:
    """Like a daily tier, an hourly one keeps recent backups: it is not an archive tier that
    gets only the first backup of each period."""
    assert not Policy(keep_hourly=24).period_tier
    assert not Policy(keep_hourly=24, keep_monthly=12).period_tier
    assert Policy(keep_hourly=0, keep_monthly=12).period_tier
    assert Policy(keep_monthly=12).period_tier


def test_an_hourly_schedule_still_sends_the_archive_tier_one_backup_a_month() -> None:
    """README "Daily or hourly": 40 days of hourly backups. The monthly tier receives the first
    backup of each UTC month and never deletes one; the hourly tier ends with 24 hours and 7
    days."""
    archive = RetentionConfig(keep_monthly=12, keep_yearly="all").policy()
    hourly = RetentionConfig(keep_hourly=24, keep_daily=7).policy()
    tiers: dict[Policy, list[Candidate]] = {archive: [], hourly: []}
    start = utc(2026, 11, 20, 0)
    for n in range(40 * 24):
        new = Candidate(bid(start + n * HOUR), True)
        for policy, tier in tiers.items():
            if not policy.period_tier or would_retain(tier, new, policy):
                tier.append(new)
            decisions = plan(tier, policy, new.time + timedelta(minutes=5))
            tier[:] = [b for b in tier if b.id in kept_ids(decisions)]
            if policy is archive:
                assert all(d.keep for d in decisions), [d.reason for d in decisions]
    assert [b.id for b in tiers[archive]] == ["20261120T000000Z", "20261201T000000Z"]
    hours = tiers[hourly]
    assert len(hours) == 24 + 6  # the newest day's first backup is one of the 24 hours
    assert {b.id for b in hours} >= {"20261223T000000Z", "20261228T000000Z"}


def test_keep_hourly_in_a_targets_retention_table() -> None:
    text = BASE.replace("retention = { keep_daily = 7, keep_weekly = 4 }",
                        "retention = { keep_hourly = 48, keep_daily = 7, keep_weekly = 4 }")
    config = parse_config(text, Path("b.toml"), env={})
    assert config.retention_for("s3").policy() == \
        Policy(keep_hourly=48, keep_daily=7, keep_weekly=4)
    assert config.retention_for("local").policy().keep_hourly is None
    hourly_all = parse_config(BASE.replace("keep_daily = 7\n", "keep_hourly = \"all\"\n", 1),
                              Path("b.toml"), env={})
    assert hourly_all.retention_for("local").policy() == Policy(keep_hourly=-1)


# -- RetentionConfig ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["all", -1, -2, -100])
def test_all_and_negative_counts_mean_every_period(value: object) -> None:
    config = RetentionConfig(keep_hourly=value, keep_daily=value, keep_weekly=value,
                             keep_monthly=value, keep_yearly=value)
    policy = config.policy()
    assert (policy.keep_hourly, policy.keep_daily, policy.keep_weekly, policy.keep_monthly,
            policy.keep_yearly) == (-1, -1, -1, -1, -1)


@pytest.mark.parametrize("value", ["-3", -3.0])
def test_negative_counts_from_strings_or_floats_mean_every_period(value: object) -> None:
    policy = RetentionConfig(keep_monthly=value).policy()
    assert policy.keep_monthly == -1
    ids = [f"2026{m:02d}01T000000Z" for m in range(1, 13)]
    kept = kept_ids(plan([Candidate(i, True) for i in ids], policy, utc(2026, 12, 2)))
    assert kept == set(ids)


def test_negative_count_from_an_environment_variable() -> None:
    config = parse_config(
        "[database]\nurl = \"postgresql://x@h/db\"\n"
        "[retention]\nkeep_daily = \"${KEEP_DAILY}\"\n"
        "[[targets]]\nname = \"local\"\ntype = \"local\"\npath = \"/b\"\n",
        Path("b.toml"), env={"KEEP_DAILY": "-3"})
    assert config.retention.keep_daily == -1


@pytest.mark.parametrize("text", ["30", "x d", "0d", "d", "-5d", "1.5d", "30y", ""])
def test_invalid_keep_within_is_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)
    with pytest.raises(ValidationError):
        RetentionConfig(keep_within=text)


@pytest.mark.parametrize("text, delta", [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)),
                                         ("2w", timedelta(weeks=2)),
                                         ("90m", timedelta(minutes=90)),
                                         (" 7D ", timedelta(days=7))])
def test_valid_durations(text: str, delta: timedelta) -> None:
    assert parse_duration(text) == delta
    assert RetentionConfig(keep_within=text).policy().keep_within == delta


def test_keep_within_in_minutes_is_explained_in_minutes() -> None:
    """Regression: reasons once rounded 90 minutes down to "within 1h"."""
    now = utc(2026, 11, 30, 2)
    decisions = plan([Candidate("20261130T003000Z", True), Candidate("20261130T010000Z", True)],
                     RetentionConfig(keep_within="90m", min_keep=0).policy(), now)
    assert [d.reason for d in decisions] == ["kept: within 90m; newest complete backup",
                                             "kept: within 90m"]
    for text, shown in (("36h", "36h"), ("2w", "14d"), ("48h", "2d"), ("30d", "30d")):
        decisions = plan([Candidate("20261130T010000Z", True)],
                         RetentionConfig(keep_within=text).policy(), now)
        assert decisions[0].reason == f"kept: within {shown}; newest complete backup; min_keep 1"


def test_other_invalid_retention_values() -> None:
    for bad in ({"keep_last": 0}, {"min_keep": -1}, {"keep_daily": "some"},
                {"keep_hourly": "some"}, {"keep_weekly": 3, "keep_minutely": 2}):
        with pytest.raises(ValidationError):
            RetentionConfig(**bad)  # type: ignore[arg-type]
    assert RetentionConfig().policy().empty
    assert RetentionConfig(min_keep=3).policy().empty
    assert not RetentionConfig(keep_daily=0).policy().empty
    assert not RetentionConfig(keep_hourly=24).policy().empty


BASE = """\
[database]
url = "postgresql://x@h/db"

[retention]
keep_daily = 7

[[targets]]
name = "local"
type = "local"
path = "/b"

[[targets]]
name = "s3"
type = "s3"
bucket = "conexa-backups"
retention = { keep_daily = 7, keep_weekly = 4 }

[[targets]]
name = "gcs"
type = "gcs"
bucket = "conexa-backups-archive"
retention = { keep_monthly = 12, keep_yearly = "all" }
"""


def test_a_targets_own_retention_replaces_the_default() -> None:
    config = parse_config(BASE, Path("b.toml"), env={})
    assert config.retention_for("local").policy() == Policy(keep_daily=7)
    assert config.retention_for("s3").policy() == Policy(keep_daily=7, keep_weekly=4)
    assert config.retention_for("gcs").policy() == Policy(keep_monthly=12, keep_yearly=-1)
    assert config.retention_for("no such target").policy() == Policy(keep_daily=7)


def test_backup_retention_days_sets_the_default_keep_within() -> None:
    config = parse_config(BASE, Path("b.toml"), env={"BACKUP_RETENTION_DAYS": "30"})
    assert config.retention.keep_within == "30d"
    assert config.retention.keep_daily == 7  # added to, not replacing, the [retention] table
    assert config.retention_for("local").policy().keep_within == timedelta(days=30)
    # A target with its own table is not affected.
    assert config.retention_for("gcs").keep_within is None
    no_table = parse_config(BASE.replace("[retention]\nkeep_daily = 7\n", ""), Path("b.toml"),
                            env={"BACKUP_RETENTION_DAYS": "30"})
    assert no_table.retention.keep_within == "30d"
    assert parse_config(BASE, Path("b.toml"), env={}).retention.keep_within is None
    with pytest.raises(ConfigError):
        parse_config(BASE, Path("b.toml"), env={"BACKUP_RETENTION_DAYS": "thirty"})


def test_no_retention_table_keeps_everything() -> None:
    config = parse_config(BASE.replace("[retention]\nkeep_daily = 7\n", ""), Path("b.toml"),
                          env={})
    policy = config.retention_for("local").policy()
    assert policy.empty
    decisions = plan([Candidate(i, True) for i in YEAR_IDS], policy, NOW)
    assert all(d.keep for d in decisions)
    assert decisions[0].reason.endswith("no retention policy")


def test_the_readmes_hourly_example_parses_to_what_it_says() -> None:
    """README "Daily or hourly": the example's tables, completed with what its ``# ...`` leaves
    out, are a valid config with the hours, days and max_backup_age the text promises."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Daily or hourly", 1)[1].split("\n## ", 1)[0]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    example = "\n".join(line[2:] for line in block.splitlines())  # indented in a list item
    assert '# ...\n' in example
    text = ("[database]\nurl = \"postgresql://x@h/db\"\n"
            "[[targets]]\nname = \"local\"\ntype = \"local\"\npath = \"/b\"\n"
            + example.replace("# ...\n", "type = \"s3\"\nbucket = \"conexa-backups\"\n"))
    config = parse_config(text, Path("b.toml"), env={})
    assert config.retention_for("local").policy() == Policy(keep_hourly=48, keep_daily=7)
    assert config.retention_for("s3").policy() == \
        Policy(keep_hourly=24, keep_daily=7, keep_weekly=4)
    assert config.monitoring.max_backup_age == "2h"
