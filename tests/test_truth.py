"""Issue 19: every signal agrees with what the tool knows (``list``, ``status``, backup runs).

An archive tier held to its own period, failed verify runs in ``status``, ``list``'s exit code
when nothing listed is usable, a backup sent to the archive tiers it skipped when every chosen
target failed, and a host clock stepped back. Real backups of the session's PostgreSQL, the CLI
as a subprocess, a real tmpfs for a disk that fills, ``faketime`` for the clock.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from conexa_backup.testing.sample import make_uploads_tree
from tests.test_failures import tmpfs
from tests.test_monitor import _flip_middle_byte, age_backup, backup, status


def _targets(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in data["targets"]}


def _local_target(name: str, path: Path, extra: str = "") -> str:
    return f'[[targets]]\nname = "{name}"\ntype = "local"\npath = "{path}"\n{extra}'


def _point(ws: Any, *, backups: Path, uploads: Path, extra: str = "") -> None:
    """The workspace's config with its local target at ``backups`` and uploads at
    ``uploads``, then ``extra``."""
    ws.write_config(extra)
    text = ws.config.read_text().replace(f'path = "{ws.backups}"', f'path = "{backups}"')
    ws.config.write_text(text.replace(f'path = "{ws.uploads}"', f'path = "{uploads}"'))


# -- list ----------------------------------------------------------------------------------

def test_list_exits_1_when_every_backup_it_shows_is_damaged(ws: Any) -> None:
    first, second = backup(ws), backup(ws)
    assert ws.run("list").returncode == 0
    _flip_middle_byte(ws.backups / first / "database.dump.zst")
    assert ws.run("verify", first).returncode == 1
    assert ws.run("list").returncode == 0  # the second one is still good

    _flip_middle_byte(ws.backups / second / "database.dump.zst")
    assert ws.run("verify", second).returncode == 1
    human, as_json = ws.run("list"), ws.run("list", "--json")

    assert human.returncode == 1 and as_json.returncode == 1, (human.stdout, as_json.stdout)
    assert "none of the 2 backup(s) listed has a usable copy" in human.stderr
    assert [e["status"] for e in json.loads(as_json.stdout)] == ["damaged", "damaged"]


# -- status: each target's own expected age --------------------------------------------------

def test_an_archive_tier_is_held_to_its_period_not_the_daily_age(ws: Any, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    ws.write_config(_local_target("archive", archive,
                                  "retention = { keep_monthly = 12, keep_yearly = 'all' }\n"))
    only = backup(ws)  # the first of its month: both targets get it
    assert (archive / only / "manifest.json").exists()
    age_backup(ws, only, timedelta(days=10))
    age_backup(ws, only, timedelta(days=10), folder=archive)

    _, _, data = status(ws)
    targets = _targets(data)
    assert targets["local"]["status"] == "CRITICAL", targets["local"]
    assert "max_backup_age (26h)" in " ".join(targets["local"]["problems"])
    assert targets["archive"]["status"] != "CRITICAL", targets["archive"]
    assert targets["archive"]["max_backup_age_rule"].startswith("monthly archive tier")
    assert targets["archive"]["max_backup_age_seconds"] == (31 * 24 + 26) * 3600
    human = ws.run("status").stdout
    assert "archive: WARNING; newest backup" in human and "monthly archive tier" in human

    age_backup(ws, only, timedelta(days=25))  # 35 days: a month was missed
    age_backup(ws, only, timedelta(days=25), folder=archive)
    _, _, data = status(ws)
    assert _targets(data)["archive"]["status"] == "CRITICAL"
    assert "monthly archive tier" in " ".join(_targets(data)["archive"]["problems"])


def test_a_target_s_own_max_backup_age_wins(ws: Any, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    ws.write_config(_local_target("archive", archive, 'max_backup_age = "3d"\n'))
    only = backup(ws)
    age_backup(ws, only, timedelta(days=2))
    age_backup(ws, only, timedelta(days=2), folder=archive)

    _, _, data = status(ws)
    assert _targets(data)["archive"]["max_backup_age_rule"] == "the target's max_backup_age (3d)"
    assert _targets(data)["archive"]["status"] != "CRITICAL"
    assert _targets(data)["local"]["status"] == "CRITICAL"

    ws.write_config(_local_target("archive", archive, 'max_backup_age = "soon"\n'))
    bad = ws.run("config", "validate")
    assert bad.returncode == 2 and "max_backup_age" in bad.stderr, bad.stderr


# -- status: failed verify runs --------------------------------------------------------------

def test_a_failed_verify_run_warns_in_status_until_a_verify_passes(ws: Any) -> None:
    backup(ws)
    ws.run("verify", "--drill")  # status is OK but for what this test adds
    assert status(ws)[0] == 0

    failed = ws.run("verify", "20200101T000000Z")
    assert failed.returncode == 2, failed.stderr
    code, line, _ = status(ws)
    assert code == 1, line
    assert "last verify run failed at " in line and "no backup with id" in line

    assert ws.run("verify", "latest").returncode == 0
    assert status(ws)[0] == 0


# -- a backup sent to the archive tier it skipped --------------------------------------------

def test_every_chosen_target_failing_sends_the_backup_to_the_skipped_archive_tier(
        ws: Any, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    tier = "retention = { keep_monthly = 12 }\n"
    ws.write_config(_local_target("archive", archive, tier))
    first = backup(ws)  # the month's first: stored on both
    big = tmp_path / "big uploads"
    make_uploads_tree(big, files=40, seed=3, incompressible_kib=64)
    with tmpfs(tmp_path / "full disk", "512k") as full:
        _point(ws, backups=full / "backups", uploads=big,
               extra=_local_target("archive", archive, tier))
        made = ws.run("backup", "--json")

    assert made.returncode == 3, (made.stdout, made.stderr)  # partial: local failed
    assert "'all'" not in made.stderr and "target 'local'" in made.stderr, made.stderr
    result = json.loads(made.stdout)
    assert result["targets"] == ["archive"] and list(result["failed_targets"]) == ["local"]
    assert result["skipped_targets"] == {}, result
    assert sorted(p.name for p in archive.iterdir() if (p / "manifest.json").exists()) \
        == sorted([first, result["id"]])
    assert ws.run("verify", result["id"], "--target", "archive").returncode == 0


def test_the_message_names_the_targets_when_every_one_fails(ws: Any, tmp_path: Path) -> None:
    big = tmp_path / "big uploads"
    make_uploads_tree(big, files=40, seed=3, incompressible_kib=64)
    with tmpfs(tmp_path / "full disk", "512k") as full:
        _point(ws, backups=full / "backups", uploads=big)
        made = ws.run("backup")
    assert made.returncode == 1
    assert "every target failed: target 'local':" in made.stderr, made.stderr
    assert "'all'" not in made.stderr


# -- a clock stepped back ----------------------------------------------------------------------

def _at(ws: Any, when: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with this host's clock at ``when`` (``faketime``; PostgreSQL keeps its own)."""
    return subprocess.run(["faketime", when, sys.executable, "-m", "conexa_backup",
                           "--config", str(ws.config), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False,
                          env={**os.environ})


def test_a_clock_stepped_back_is_refused_not_filed_in_the_past(ws: Any) -> None:
    newest = backup(ws)

    refused = _at(ws, "2025-06-01 00:00:00", "backup")
    assert refused.returncode == 2, refused.stderr
    assert "this host's clock (2025-06-01 00:00:" in refused.stderr  # faketime's clock ticks
    assert f"UTC) is behind the newest backup, {newest} (" in refused.stderr
    assert "--allow-clock-skew" in refused.stderr
    assert [e["id"] for e in json.loads(ws.run("list", "--json").stdout)] == [newest]

    behind = _at(ws, "2025-06-01 00:00:00", "status", "--json")
    data = json.loads(behind.stdout)
    assert behind.returncode == 1, data
    assert "this host's clock (2025-06-01 00:0" in data["summary"]
    assert f"UTC) is behind the newest backup, {newest}" in data["summary"]
    assert all(t["backup_age_seconds"] >= 0 for t in data["targets"]), data
    assert data["age_seconds"] >= 0
    human = _at(ws, "2025-06-01 00:00:00", "status").stdout
    assert f"newest backup {newest} (0 min ago" in human
    assert not re.search(r"-\d+ (min|h|days)", human), human

    stored = _at(ws, "2025-06-01 00:00:00", "backup", "--allow-clock-skew", "--no-prune")
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout.strip().startswith("20250601T0000")
