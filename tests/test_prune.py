"""``prune`` and auto-prune end to end: the real CLI on real backups, some of them "old".

Old backups are made without waiting: a real backup's files are stored again under an older
id (through the target's own API, so local, S3 and GCS alike), with the manifest's ``id``
rewritten to match (the catalog checks that the manifest describes its folder). Sizes and
SHA-256 stay valid, so these copies verify like any other.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conexa_backup.actions.backup import _not_retained
from conexa_backup.actions.context import Context
from conexa_backup.actions.prune import prune as prune_action
from conexa_backup.config import Config, load_config
from conexa_backup.retention import Candidate
from conexa_backup.state import runs
from conexa_backup.storage.base import Target
from conexa_backup.storage.registry import create_target
from conexa_backup.testing.emulators import GCSServer, S3Server
from tests.conftest import GCS_BUCKET, S3_BUCKET, Workspace

FMT = "%Y%m%dT%H%M%SZ"
DAY = timedelta(days=1)
_prefixes = itertools.count()


# -- helpers ---------------------------------------------------------------------------------

def midnight() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def old_id(days: int, hour: int = 1) -> str:
    """An id ``days`` before today, at ``hour``:00 UTC."""
    return (midnight() - days * DAY + timedelta(hours=hour)).strftime(FMT)


def run_json(ws: Workspace, *args: str, code: int = 0) -> Any:
    result = ws.run(*args, "--json")
    assert result.returncode == code, (args, result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def make_backup(ws: Workspace, *args: str) -> str:
    return str(run_json(ws, "backup", *args)["id"])


def listed(ws: Workspace) -> dict[str, str]:
    """id -> status, from ``list --json``."""
    return {b["id"]: b["status"] for b in run_json(ws, "list")}


def prune_of(report: list[dict[str, Any]], target: str) -> dict[str, Any]:
    return next(p for p in report if p["target"] == target)


def planned(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in entry["plan"]}


def config_of(ws: Workspace) -> Config:
    config, _ = load_config(ws.config)
    return config


def target_named(ws: Workspace, name: str) -> Target:
    config = config_of(ws)
    return create_target(next(t for t in config.targets if t.name == name))


def put(target: Target, key: str, data: bytes) -> None:
    upload = target.writer(key)
    upload.write(data)
    upload.commit()


def seed(target: Target, source: Path, new_id: str, *, manifest: bool = True) -> None:
    """Store the backup in folder ``source`` on ``target`` as ``new_id`` (manifest last)."""
    doc = json.loads((source / "manifest.json").read_bytes())
    for path in sorted(source.iterdir()):
        if path.name != "manifest.json":
            put(target, f"{new_id}/{path.name}", path.read_bytes())
    if manifest:
        when = datetime.strptime(new_id.split("-")[0], FMT).replace(tzinfo=UTC)
        doc["id"] = new_id
        doc["started_at"] = when.isoformat().replace("+00:00", "Z")
        doc["finished_at"] = (when + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
        put(target, f"{new_id}/manifest.json", json.dumps(doc, indent=2).encode())


def keys(target: Target) -> set[str]:
    return {o.key for o in target.list()}


def with_retention(ws: Workspace, retention: str, extra: str = "") -> None:
    """Rewrite the config: the local target, ``extra`` targets, then ``[retention]``."""
    ws.write_config(extra + ("\n[retention]\n" + retention + "\n" if retention else ""))


# -- prune on the local target ---------------------------------------------------------------

def test_dry_run_then_prune_then_nothing_more(ws: Workspace) -> None:
    with_retention(ws, "keep_daily = 3")
    newest = make_backup(ws)
    local = target_named(ws, "local")
    ids = {"d1": old_id(1, 1), "d1b": old_id(1, 2), "d2": old_id(2), "d3": old_id(3),
           "d10": old_id(10)}
    for backup_id in ids.values():
        seed(local, ws.backups / newest, backup_id)
    everything = {newest, *ids.values()}
    assert listed(ws) == dict.fromkeys(everything, "complete")

    # Days with a backup: today, D-1, D-2, D-3, D-10; the newest 3 keep their first backup.
    keep = {newest, ids["d1"], ids["d2"]}
    gone = everything - keep

    dry = prune_of(run_json(ws, "prune", "--dry-run"), "local")
    plan = planned(dry)
    assert set(plan) == everything and dry["deleted"] == [] and dry["skipped"] is None
    assert {i for i, d in plan.items() if d["keep"]} == keep
    day = lambda i: f"{i[:4]}-{i[4:6]}-{i[6:8]}"  # noqa: E731
    assert plan[ids["d1"]]["reason"] == f"kept: daily {day(ids['d1'])}"
    assert plan[ids["d1b"]]["reason"] == "deleted: beyond keep_daily"
    assert plan[ids["d10"]]["reason"] == "deleted: beyond keep_daily"
    assert plan[newest]["reason"].startswith(f"kept: daily {day(newest)}")
    assert "newest complete backup" in plan[newest]["reason"]
    assert {p.name for p in ws.backups.iterdir()} == everything  # a dry run deletes nothing

    done = prune_of(run_json(ws, "prune"), "local")
    assert set(done["deleted"]) == gone and done["errors"] == []
    assert {i for i, d in planned(done).items() if not d["keep"]} == gone
    assert {p.name for p in ws.backups.iterdir()} == keep
    assert listed(ws) == dict.fromkeys(keep, "complete")

    again = prune_of(run_json(ws, "prune"), "local")
    assert again["deleted"] == []
    assert all(d["keep"] for d in again["plan"])
    assert set(planned(again)) == keep
    assert listed(ws) == dict.fromkeys(keep, "complete")
    # What stays is still a good backup.
    assert ws.run("verify", newest).returncode == 0


def test_at_a_future_time_previews_and_deletes_nothing(ws: Workspace) -> None:
    with_retention(ws, 'keep_within = "20d"')
    newest = make_backup(ws)
    local = target_named(ws, "local")
    recent, older = old_id(2), old_id(10)
    for backup_id in (recent, older):
        seed(local, ws.backups / newest, backup_id)

    now = prune_of(run_json(ws, "prune", "--dry-run"), "local")
    assert all(d["keep"] for d in now["plan"])

    future = (datetime.now(UTC) + 15 * DAY).strftime("%Y-%m-%dT%H:%MZ")
    report = prune_of(run_json(ws, "prune", "--at", future), "local")  # no --dry-run
    plan = planned(report)
    assert plan[older] == {"id": older, "keep": False, "reason": "deleted: beyond keep_within"}
    assert plan[recent]["keep"] and plan[recent]["reason"] == "kept: within 20d"
    assert plan[newest]["keep"]
    assert report["deleted"] == []
    assert set(listed(ws)) == {newest, recent, older}

    far = (datetime.now(UTC) + 400 * DAY).isoformat()
    plan = planned(prune_of(run_json(ws, "prune", "--at", far), "local"))
    assert {i for i, d in plan.items() if d["keep"]} == {newest}  # the floor, nothing else
    assert plan[newest]["reason"] == "kept: newest complete backup; min_keep 1"
    assert set(listed(ws)) == {newest, recent, older}

    bad = ws.run("prune", "--at", "next tuesday")
    assert bad.returncode == 2 and "--at" in bad.stderr


def test_unknown_files_survive_and_old_leftovers_go(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 1")
    newest = make_backup(ws)
    files = {p.name for p in (ws.backups / newest).iterdir()}
    assert {"manifest.json", "database.dump.zst"} <= files
    local = target_named(ws, "local")
    doomed, leftover, young = old_id(5), old_id(3), \
        (datetime.now(UTC) - timedelta(hours=2)).strftime(FMT)
    seed(local, ws.backups / newest, doomed)
    seed(local, ws.backups / newest, leftover, manifest=False)  # a run that died 3 days ago
    seed(local, ws.backups / newest, young, manifest=False)  # maybe still running elsewhere
    damaged = old_id(6)  # a manifest we cannot read: never deleted, whatever its age
    seed(local, ws.backups / newest, damaged)
    (ws.backups / damaged / "manifest.json").write_text("{ not json")
    (ws.backups / "notes.txt").write_text("the admin's notes")
    (ws.backups / "other").mkdir()
    (ws.backups / "other" / "keep.me").write_text("not ours")
    (ws.backups / newest / "README").write_text("a note next to the newest backup")
    (ws.backups / doomed / "README").write_text("a note inside a pruned backup")
    assert listed(ws) == {newest: "complete", doomed: "complete", leftover: "incomplete",
                          young: "incomplete", damaged: "damaged"}

    report = prune_of(run_json(ws, "prune"), "local")
    plan = planned(report)
    assert set(report["deleted"]) == {doomed, leftover}
    assert plan[leftover]["reason"] == "deleted: incomplete leftover older than a day"
    assert plan[young] == {"id": young, "keep": True, "reason":
                           "kept: incomplete, less than a day old (a run may be in progress)"}
    assert plan[doomed]["reason"] == "deleted: beyond keep_last"
    assert plan[damaged] == {"id": damaged, "keep": True,
                             "reason": "kept: manifest unreadable: kept for inspection"}
    assert {p.name for p in (ws.backups / damaged).iterdir()} == files

    assert (ws.backups / "notes.txt").read_text() == "the admin's notes"
    assert (ws.backups / "other" / "keep.me").read_text() == "not ours"
    assert (ws.backups / newest / "README").is_file()
    assert (ws.backups / doomed / "README").read_text() == "a note inside a pruned backup"
    assert sorted(p.name for p in (ws.backups / doomed).iterdir()) == ["README"]
    assert not (ws.backups / leftover).exists()
    assert {p.name for p in (ws.backups / young).iterdir()} == files - {"manifest.json"}
    assert {p.name for p in (ws.backups / newest).iterdir()} == files | {"README"}
    assert ws.run("verify", newest).returncode == 0


def test_a_pruned_folder_with_a_foreign_file_is_not_a_backup_any_more(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 1")
    newest = make_backup(ws)
    doomed = old_id(5)
    seed(target_named(ws, "local"), ws.backups / newest, doomed)
    (ws.backups / doomed / "README").write_text("a note inside a pruned backup")
    assert prune_of(run_json(ws, "prune"), "local")["deleted"] == [doomed]
    assert (ws.backups / doomed / "README").is_file()
    again = prune_of(run_json(ws, "prune"), "local")
    assert again["deleted"] == [], "the second prune claims to delete it again"
    assert listed(ws) == {newest: "complete"}


def test_a_prune_killed_half_way_leaves_an_incomplete_backup(ws: Workspace) -> None:
    """Delete removes the manifest first: killed just after that, the rest is a leftover."""
    with_retention(ws, "keep_daily = 7")  # would keep both, were they complete
    newest = make_backup(ws)
    local = target_named(ws, "local")
    half_old, half_young = old_id(2), (datetime.now(UTC) - timedelta(hours=1)).strftime(FMT)
    for backup_id in (half_old, half_young):
        seed(local, ws.backups / newest, backup_id)
        (ws.backups / backup_id / "manifest.json").unlink()  # the prune died right here

    entries = {b["id"]: b for b in run_json(ws, "list")}
    for backup_id in (half_old, half_young):
        assert entries[backup_id]["status"] == "incomplete"
        assert entries[backup_id]["targets"] == []
        assert entries[backup_id]["incomplete_targets"] == ["local"]
    restore = ws.run("restore", half_old, "--only", "database",
                     "--to-database", f"{ws.dbname}_x")
    assert restore.returncode != 0 and "incomplete" in restore.stderr

    report = prune_of(run_json(ws, "prune"), "local")
    assert report["deleted"] == [half_old]
    assert not (ws.backups / half_old).exists()
    assert planned(report)[half_young]["keep"]
    assert set(listed(ws)) == {newest, half_young}


# -- never prune a target whose backup failed in this run ------------------------------------

def _two_targets(ws: Workspace, b: Path) -> None:
    with_retention(ws, "keep_last = 1",
                   f'[[targets]]\nname = "b"\ntype = "local"\npath = "{b}"\n')


def test_a_target_whose_backup_failed_is_not_pruned(ws: Workspace) -> None:
    b = ws.root / "b"
    _two_targets(ws, b)
    first = make_backup(ws, "--no-prune")
    olds = [old_id(3), old_id(2)]
    for name in ("local", "b"):
        for backup_id in olds:
            seed(target_named(ws, name), ws.backups / first, backup_id)
    # b stays listable, but no backup can be written there for the next minutes: a file
    # already sits where each id's folder would be created.
    start = datetime.now(UTC) - timedelta(seconds=2)
    for s in range(240):
        name = (start + timedelta(seconds=s)).strftime(FMT)
        for blocked in (b / name, b / f"{name}-1"):
            if not blocked.exists():
                blocked.write_text("in the way")

    result = ws.run("backup", "--json")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "partial" and report["targets"] == ["local"]
    assert "b" in report["failed_targets"]
    assert [p["target"] for p in report["pruned"]] == ["local"]
    assert set(prune_of(report["pruned"], "local")["deleted"]) == {first, *olds}
    assert {p.name for p in ws.backups.iterdir()} == {report["id"]}
    # b: nothing of this run, and every older backup still there.
    assert {p.name for p in b.iterdir() if p.is_dir()} == {first, *olds}
    assert set(listed(ws)) == {report["id"], first, *olds}


def test_prune_skips_the_targets_it_is_told_to(ws: Workspace) -> None:
    b = ws.root / "b"
    _two_targets(ws, b)
    first = make_backup(ws, "--no-prune")
    olds = [old_id(3), old_id(2)]
    for name in ("local", "b"):
        for backup_id in olds:
            seed(target_named(ws, name), ws.backups / first, backup_id)

    results = prune_action(Context(config_of(ws)), skip={"b": "its backup failed in this run"})
    by_target = {r.target: r for r in results}
    assert by_target["b"].skipped == "its backup failed in this run"
    assert by_target["b"].decisions == [] and by_target["b"].deleted == []
    assert set(by_target["local"].deleted) == set(olds)
    assert {p.name for p in b.iterdir()} == {first, *olds}
    assert {p.name for p in ws.backups.iterdir()} == {first}

    # The CLI reports a skipped target; without the skip, b is pruned like any other.
    report = run_json(ws, "prune")
    assert set(prune_of(report, "b")["deleted"]) == set(olds)
    assert {p.name for p in b.iterdir()} == {first}


# -- safety: the newest verified backup ------------------------------------------------------

def test_the_newest_verified_backup_is_protected(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 1")
    newest = make_backup(ws)
    local = target_named(ws, "local")
    older, verified, between = old_id(9), old_id(6), old_id(3)
    for backup_id in (older, verified, between):
        seed(local, ws.backups / newest, backup_id)
    assert ws.run("verify", older).returncode == 0
    assert ws.run("verify", verified).returncode == 0  # the newest that passed
    assert set(json.loads((ws.state / "verified.json").read_text())) == {older, verified}

    report = prune_of(run_json(ws, "prune"), "local")
    plan = planned(report)
    assert set(report["deleted"]) == {older, between}
    assert plan[verified]["reason"] == "kept: newest verified backup"
    assert plan[newest]["reason"] == "kept: last 1; newest complete backup; min_keep 1"
    assert set(listed(ws)) == {newest, verified}


# -- auto-prune after backup -----------------------------------------------------------------

def test_auto_prune_after_backup(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 2")
    made = [make_backup(ws) for _ in range(3)]
    assert set(listed(ws)) == set(made[1:])

    report = run_json(ws, "backup", "--no-prune")
    assert report["pruned"] == []
    assert set(listed(ws)) == {*made[1:], report["id"]}

    with_retention(ws, "keep_last = 2\nprune_after_backup = false")
    report2 = run_json(ws, "backup")
    assert report2["pruned"] == []
    everything = {*made[1:], report["id"], report2["id"]}
    assert set(listed(ws)) == everything

    with_retention(ws, "keep_last = 2")
    last = run_json(ws, "backup")
    entry = prune_of(last["pruned"], "local")
    assert set(entry["deleted"]) == everything - {report2["id"]}
    assert set(listed(ws)) == {report2["id"], last["id"]}


# -- cloud targets: an archive tier, and pruning on S3 and GCS -------------------------------

def _prefix() -> str:
    return f"prune-{os.getpid()}-{next(_prefixes)}"


def _gcs_tier(prefix: str) -> str:
    return (f'[[targets]]\nname = "gcs"\ntype = "gcs"\nbucket = "{GCS_BUCKET}"\n'
            f'prefix = "{prefix}"\nretention = {{ keep_monthly = 12 }}\n')


def test_a_monthly_archive_tier_gets_the_first_backup_of_the_month_only(
        ws: Workspace, gcs_server: GCSServer) -> None:
    source = make_backup(ws)  # local only: the files to seed the tier with
    now = datetime.now(UTC)
    if now.day == 1 and now.hour == 0:
        pytest.skip("the month has just begun: no 'earlier this month' to seed")

    # A tier that already holds a backup from earlier this month: not sent another one.
    seeded_prefix = _prefix()
    ws.write_config(_gcs_tier(seeded_prefix))
    earlier = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).strftime(FMT)
    gcs = target_named(ws, "gcs")
    seed(gcs, ws.backups / source, earlier)
    before = keys(gcs)
    report = run_json(ws, "backup")
    assert report["targets"] == ["local"]
    assert "gcs" in report["skipped_targets"]
    assert report["failed_targets"] == {}
    assert [p["target"] for p in report["pruned"]] == ["local"]  # gcs untouched, not pruned
    assert keys(gcs) == before
    entries = {b["id"]: b["targets"] for b in run_json(ws, "list")}
    assert entries[report["id"]] == ["local"] and entries[earlier] == ["gcs"]

    # An empty tier: this is the month's first backup there, so it goes to both...
    ws.write_config(_gcs_tier(_prefix()))
    both = run_json(ws, "backup")
    assert both["targets"] == ["local", "gcs"] and both["skipped_targets"] == {}
    # ... and the next one of the month only to local.
    again = run_json(ws, "backup")
    assert again["targets"] == ["local"] and "gcs" in again["skipped_targets"]
    gcs = target_named(ws, "gcs")
    assert {k.partition("/")[0] for k in keys(gcs)} == {both["id"]}


def test_an_hourly_tier_is_sent_every_backup(ws: Workspace, gcs_server: GCSServer) -> None:
    """keep_hourly keeps recent backups: a second backup of the hour goes there too (it is
    that tier's newest), unlike on an archive tier of monthly backups."""
    source = make_backup(ws)
    hourly = _gcs_tier(_prefix()).replace("keep_monthly = 12",
                                           "keep_hourly = 24, keep_monthly = 12")
    assert "keep_hourly" in hourly
    ws.write_config(hourly + "\n[retention]\nkeep_daily = 7\n")
    seed(target_named(ws, "gcs"), ws.backups / source, source)  # this hour's first, on both
    ctx = Context(config_of(ws))
    targets = ctx.targets()
    new = Candidate(datetime.now(UTC).strftime(FMT) + "-1", True)
    assert _not_retained(ctx, targets, ctx.scan(targets), new) == {}


def test_dry_run_says_which_hour_each_backup_represents(ws: Workspace) -> None:
    with_retention(ws, "keep_hourly = 2\nkeep_daily = 2")
    newest = make_backup(ws)
    local = target_named(ws, "local")
    half_past_ten = (midnight() - DAY + timedelta(hours=10, minutes=30)).strftime(FMT)
    ids = {"h10": old_id(1, 10), "h10b": half_past_ten, "h11": old_id(1, 11),
           "h12": old_id(1, 12), "d2": old_id(2), "d3": old_id(3)}
    for backup_id in ids.values():
        seed(local, ws.backups / newest, backup_id)

    # Hours with a backup, newest first: now's, D-1T12, D-1T11, D-1T10: the newest two are
    # kept. Days: today's and D-1's, whose first backup is the one at 10:00.
    keep = {newest, ids["h12"], ids["h10"]}
    plan = planned(prune_of(run_json(ws, "prune", "--dry-run"), "local"))
    assert {i for i, d in plan.items() if d["keep"]} == keep
    hour = lambda i: f"{i[:4]}-{i[4:6]}-{i[6:8]}T{i[9:11]}"  # noqa: E731
    assert plan[ids["h12"]]["reason"] == f"kept: hourly {hour(ids['h12'])}"
    assert plan[ids["h10"]]["reason"] == f"kept: daily {hour(ids['h10'])[:10]}"
    assert plan[ids["h10b"]]["reason"] == "deleted: beyond keep_hourly, keep_daily"
    assert plan[ids["h11"]]["reason"] == "deleted: beyond keep_hourly, keep_daily"
    assert plan[newest]["reason"].startswith(
        f"kept: hourly {hour(newest)}; daily {hour(newest)[:10]}; newest complete backup")

    done = prune_of(run_json(ws, "prune"), "local")
    assert set(done["deleted"]) == set(ids.values()) - keep and done["errors"] == []
    assert {p.name for p in ws.backups.iterdir()} == keep


def test_a_second_backup_the_same_day_is_not_sent_to_the_archive_tier(
        ws: Workspace, gcs_server: GCSServer) -> None:
    source = make_backup(ws)
    ws.write_config(_gcs_tier(_prefix()) + "\n[retention]\nkeep_daily = 7\n")
    seed(target_named(ws, "gcs"), ws.backups / source, source)  # this month's first, on both
    ctx = Context(config_of(ws))
    targets = ctx.targets()
    new = Candidate(datetime.now(UTC).strftime(FMT) + "-1", True)
    skipped = _not_retained(ctx, targets, ctx.scan(targets), new)
    assert "gcs" in skipped


@pytest.mark.parametrize("kind", ["s3", "gcs"])
def test_prune_on_a_cloud_target(ws: Workspace, s3_server: S3Server, gcs_server: GCSServer,
                                 kind: str) -> None:
    source = make_backup(ws)
    prefix = _prefix()
    where = (f'bucket = "{S3_BUCKET}"\nendpoint_url = "{s3_server.endpoint}"\n' if kind == "s3"
             else f'bucket = "{GCS_BUCKET}"\n')
    cloud = (f'[[targets]]\nname = "{kind}"\ntype = "{kind}"\n{where}prefix = "{prefix}"\n'
             f'retention = {{ keep_daily = 2, keep_weekly = 1 }}\n')
    neighbour = cloud.replace(f'name = "{kind}"', 'name = "neighbour"') \
        .replace(f'prefix = "{prefix}"', f'prefix = "{prefix}x"')  # shares the string prefix
    ws.write_config(cloud + neighbour)
    target, other = target_named(ws, kind), target_named(ws, "neighbour")

    # D-1 and D-2 are the two newest days; the newest week's first backup is one of them
    # (whatever today's weekday), and D-30 and D-40 are in older weeks: the plan is the same
    # any day.
    ids = [old_id(1), old_id(2), old_id(30), old_id(40)]
    for backup_id in ids:
        seed(target, ws.backups / source, backup_id)
        seed(other, ws.backups / source, backup_id)
    seed(target, ws.backups / source, old_id(35), manifest=False)  # an old leftover
    put(target, "notes.txt", b"not ours")
    put(target, "other/thing.bin", b"not ours either")
    put(target, f"{ids[3]}/README", b"a note in a backup's folder")
    others_before = keys(other)

    report = run_json(ws, "prune", "--target", kind)
    assert [p["target"] for p in report] == [kind]
    entry = report[0]
    plan = planned(entry)
    kept = {i for i, d in plan.items() if d["keep"]}
    assert kept == set(ids[:2])
    assert plan[ids[0]]["reason"].startswith(f"kept: daily {ids[0][:4]}-")
    assert "newest complete backup" in plan[ids[0]]["reason"]
    assert set(entry["deleted"]) == {ids[2], ids[3], old_id(35)}
    assert plan[ids[2]]["reason"] == "deleted: beyond keep_daily, keep_weekly"
    assert plan[old_id(35)]["reason"] == "deleted: incomplete leftover older than a day"

    left = keys(target)
    assert {k for k in left if "/" not in k or k.startswith("other/")} == \
        {"notes.txt", "other/thing.bin"}
    assert f"{ids[3]}/README" in left
    assert {k.partition("/")[0] for k in left if k.endswith("/manifest.json")} == set(ids[:2])
    assert not any(k.startswith((f"{ids[2]}/", f"{old_id(35)}/")) for k in left)
    assert keys(other) == others_before  # the neighbouring prefix: untouched

    again = run_json(ws, "prune", "--target", kind)
    assert set(again[0]["deleted"]) <= {ids[3]}  # see the xfail above for the README case
    assert {k.partition("/")[0] for k in keys(target) if k.endswith("/manifest.json")} == \
        set(ids[:2])


def test_prune_command_exit_code_when_a_target_cannot_be_listed(ws: Workspace) -> None:
    """A target that cannot be listed is reported (exit 3) and the others are pruned."""
    with_retention(ws, "keep_last = 1", '[[targets]]\nname = "dead"\ntype = "s3"\n'
                   'bucket = "nope"\nendpoint_url = "http://127.0.0.1:9"\nretries = 1\n')
    newest = make_backup(ws, "--target", "local")
    seed(target_named(ws, "local"), ws.backups / newest, old_id(4))
    result = ws.run("prune", "--json", timeout=120)
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert prune_of(report, "dead")["skipped"]
    assert prune_of(report, "local")["deleted"] == [old_id(4)]
    assert "dead" in result.stderr


# -- damaged copies, the newest verified copy per target, safety backups ------------------------

def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_day_keeps_the_backup_whose_drill_passed_not_the_one_that_failed(
        ws: Workspace) -> None:
    """The trial: two backups on one day, the first one's drill failed, the second one's
    passed; prune deleted the second and kept the first as the day's representative."""
    with_retention(ws, "keep_daily = 7")
    newest = make_backup(ws)
    local = target_named(ws, "local")
    failed, passed = old_id(2, 1), old_id(2, 13)
    for backup_id in (failed, passed):
        seed(local, ws.backups / newest, backup_id)
    _flip_middle_byte(ws.backups / failed / "database.dump.zst")
    assert ws.run("verify", "--drill", failed).returncode == 1
    assert ws.run("verify", "--drill", passed).returncode == 0
    assert ws.run("verify", newest).returncode == 0  # the newest verified one is another

    report = prune_of(run_json(ws, "prune"), "local")
    day = f"{passed[:4]}-{passed[4:6]}-{passed[6:8]}"
    assert planned(report)[passed]["reason"] == f"kept: daily {day}"
    assert planned(report)[failed]["reason"] == "deleted: beyond keep_daily"
    assert report["deleted"] == [failed]
    assert set(listed(ws)) == {newest, passed}
    # Its damage record went with it.
    assert failed not in json.loads((ws.state / "damaged.json").read_text())


def test_the_newest_copy_verified_on_each_target_is_protected(ws: Workspace) -> None:
    """Protection is per target: the newest backup verified anywhere may not be on this
    target at all, and the newest one verified *here* must still stay."""
    b = ws.root / "b"
    _two_targets(ws, b)  # keep_last = 1
    newest = make_backup(ws, "--no-prune")
    both, only_b = old_id(6), old_id(3)
    for name in ("local", "b"):
        seed(target_named(ws, name), ws.backups / newest, both)
    seed(target_named(ws, "b"), ws.backups / newest, only_b)
    assert ws.run("verify", both, "--target", "local").returncode == 0
    assert ws.run("verify", only_b).returncode == 0  # newer, but not on local

    report = run_json(ws, "prune")
    local, on_b = planned(prune_of(report, "local")), planned(prune_of(report, "b"))
    assert local[both]["reason"] == "kept: newest verified backup"
    assert on_b[only_b]["reason"] == "kept: newest verified backup"
    assert not on_b[both]["keep"]  # on b, a newer verified copy stands in for it
    assert {p.name for p in ws.backups.iterdir()} == {newest, both}
    assert {p.name for p in b.iterdir()} == {newest, only_b}


def test_a_damaged_copy_is_not_the_newest_verified_one(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 1")
    newest = make_backup(ws)
    local = target_named(ws, "local")
    older, broken = old_id(6), old_id(3)
    for backup_id in (older, broken):
        seed(local, ws.backups / newest, backup_id)
    assert ws.run("verify", older).returncode == 0
    assert ws.run("verify", broken).returncode == 0
    _flip_middle_byte(ws.backups / broken / "database.dump.zst")
    assert ws.run("verify", broken).returncode == 1  # verified once, damaged since

    plan = planned(prune_of(run_json(ws, "prune"), "local"))
    assert plan[older]["reason"] == "kept: newest verified backup"
    assert not plan[broken]["keep"]


def test_a_safety_backup_survives_the_next_backups_prune(ws: Workspace) -> None:
    with_retention(ws, "keep_last = 1")
    first = make_backup(ws)
    ws.cluster.execute("DELETE FROM grades", ws.dbname)
    restored = run_json(ws, "restore", first, "--yes")
    safety = restored["safety_backup_id"]
    assert safety

    after = run_json(ws, "backup")
    pruned = prune_of(after["pruned"], "local")
    assert planned(pruned)[safety]["reason"] == "kept: safety backup, kept 7d"
    assert first in pruned["deleted"]
    assert set(listed(ws)) == {safety, after["id"]}

    # A week later it goes like any other backup the policy does not keep.
    later = (datetime.now(UTC) + timedelta(days=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    preview = planned(prune_of(run_json(ws, "prune", "--at", later), "local"))
    assert not preview[safety]["keep"]
    # safety_keep_within in the retention table sets how long.
    with_retention(ws, 'keep_last = 1\nsafety_keep_within = "1h"')
    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert not planned(prune_of(run_json(ws, "prune", "--at", soon), "local"))[safety]["keep"]
    assert planned(prune_of(run_json(ws, "prune", "--dry-run"), "local"))[safety]["keep"]


def test_a_prune_that_fails_after_the_backup_makes_it_partial_everywhere(ws: Workspace) -> None:
    """Exit 3, the --json status and the event agree (one rule, BackupResult.partial): the API
    judges a job whose server restarted from that status (found by review: a failed prune
    was 'complete' in the JSON while the exit said partial)."""
    with_retention(ws, "keep_last = 1")
    old = make_backup(ws)
    [stuck] = (ws.backups / old).glob("database.*")
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # even root cannot delete it
    try:
        made = ws.run("backup", "--json")
        assert made.returncode == 3, made.stderr
        assert "pruning failed" in made.stderr
        assert json.loads(made.stdout)["status"] == "partial"
        assert runs(ws.state)[-1]["outcome"] == "partial"
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
