"""Monitoring (README, "Monitoring"): ``status`` for Nagios, the Prometheus textfile, ``report``.

Real backups and restore drills against the session's PostgreSQL, the CLI as a subprocess.
``status`` speaks the Nagios plugin convention (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN, and a
first line ``CONEXA-BACKUP <LEVEL> - <summary>``); a stale backup is made by moving its
manifest's times into the past (and dropping the manifest cache), never by waiting.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pytest_httpserver import HTTPServer

from conexa_backup.actions.context import Context
from conexa_backup.actions.history import history
from conexa_backup.config.loading import load_config
from conexa_backup.testing.cluster import free_port
from conexa_backup.testing.sample import make_uploads_tree

# pytest-httpserver listens on "localhost" by default, which may resolve to ::1 first; its
# session fixture reads this when first used, after collection.
os.environ.setdefault("PYTEST_HTTPSERVER_HOST", "127.0.0.1")

MISSING_DB = "conexa_no_such_database"
ID_RE = re.compile(r"\d{8}T\d{6}Z(-\d+)?")


@pytest.fixture(autouse=True)
def _no_seed_notifiers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLACK_WEBHOOK_URL", "BACKUP_NOTIFY_EMAIL"):
        monkeypatch.delenv(var, raising=False)


# -- helpers ----------------------------------------------------------------------------------

def backup(ws: Any) -> str:
    result = ws.run("backup")
    assert result.returncode == 0, result.stderr
    backup_id: str = result.stdout.strip().splitlines()[-1]
    assert ID_RE.fullmatch(backup_id), result.stdout
    return backup_id


def failed_backup(ws: Any, extra: str = "") -> None:
    """A backup run that fails (the database does not exist); the config is then restored."""
    ws.write_config(extra, database=MISSING_DB)
    result = ws.run("backup")
    assert result.returncode == 1, result.stderr
    assert "does not exist" in result.stderr
    ws.write_config(extra)


def drill(ws: Any) -> dict[str, Any]:
    result = ws.run("verify", "--drill", "--json")
    assert result.returncode == 0, (result.stdout, result.stderr)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def status(ws: Any) -> tuple[int, str, dict[str, Any]]:
    """``status`` twice: (exit code, first human line, the --json document)."""
    human = ws.run("status")
    as_json = ws.run("status", "--json")
    assert human.returncode == as_json.returncode, (human.stdout, as_json.stdout)
    assert human.stderr == "" and as_json.stderr == "", (human.stderr, as_json.stderr)
    data: dict[str, Any] = json.loads(as_json.stdout)
    assert data["code"] == human.returncode
    return human.returncode, human.stdout.splitlines()[0], data


def age_backup(ws: Any, backup_id: str, by: timedelta, folder: Path | None = None) -> None:
    """Make a stored backup look ``by`` older: move its manifest's times, drop the cache."""
    path = (folder or ws.backups) / backup_id / "manifest.json"
    data = json.loads(path.read_text())
    for key in ("started_at", "finished_at"):
        when = datetime.fromisoformat(data[key].replace("Z", "+00:00")) - by
        data[key] = when.isoformat().replace("+00:00", "Z")
    path.write_text(json.dumps(data, indent=2) + "\n")
    for cached in (ws.state / "cache").rglob("*.json"):
        cached.unlink()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- status -------------------------------------------------------------------------------------

def test_status_without_any_backup_is_critical(ws: Any) -> None:
    code, line, data = status(ws)

    assert code == 2
    assert line.startswith("CONEXA-BACKUP CRITICAL - ")
    assert "local: no complete backup" in line
    assert data["status"] == "CRITICAL"
    assert data["last_backup"] is None
    assert [t["status"] for t in data["targets"]] == ["CRITICAL"]


def test_status_fresh_backup_warns_until_a_drill_passes(ws: Any) -> None:
    backup_id = backup(ws)

    code, line, data = status(ws)
    assert code == 1
    assert line.startswith("CONEXA-BACKUP WARNING - ")
    assert "no successful restore drill within 8d" in line
    assert data["status"] == "WARNING"
    assert data["last_backup"]["id"] == backup_id
    assert data["targets"][0]["newest_backup"] == backup_id
    assert 0 <= data["targets"][0]["backup_age_seconds"] < 120

    drill(ws)

    code, line, data = status(ws)
    assert code == 0, line
    assert line.startswith("CONEXA-BACKUP OK - ")
    assert "on all 1 target(s)" in line
    assert data["status"] == "OK"
    assert data["targets"][0]["problems"] == []
    assert data["targets"][0]["newest_successful_drill"]["backup_id"] == backup_id
    assert data["last_backup_run"]["outcome"] == "success"


def test_status_stale_backup_is_critical(ws: Any) -> None:
    ws.write_config('[monitoring]\nmax_backup_age = "1m"\n')
    backup_id = backup(ws)
    drill(ws)
    assert status(ws)[0] == 0  # fresh: within one minute

    age_backup(ws, backup_id, timedelta(hours=2))

    code, line, data = status(ws)
    assert code == 2
    assert line.startswith("CONEXA-BACKUP CRITICAL - ")
    assert "local: newest backup older than 1m" in line
    target = data["targets"][0]
    assert target["status"] == "CRITICAL"
    assert target["backup_age_seconds"] >= 2 * 3600
    assert data["age_seconds"] >= 2 * 3600


def test_status_critical_when_only_suspect_backups_are_fresh(ws: Any) -> None:
    """The newest backups all have suspect uploads (the volume was not mounted two nights)
    and the newest trusted one is older than ``max_backup_age``: CRITICAL, as prune and
    ``restore latest`` do not trust them either. Before: the suspect backups counted as
    fresh good backups, and status only warned."""
    ws.write_config('[monitoring]\nmax_backup_age = "1h"\n')
    trusted = backup(ws)
    drill(ws)
    age_backup(ws, trusted, timedelta(hours=2))
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir()
    for _ in range(2):
        assert ws.run("backup").returncode == 3

    code, line, data = status(ws)
    assert code == 2, line
    assert "local: newest good backup older than 1h" in line, line
    assert data["targets"][0]["newest_backup"] == trusted
    assert data["last_backup"]["id"] == trusted and data["age_seconds"] >= 2 * 3600


def test_a_failed_drill_warns_in_status_until_a_drill_of_it_passes(ws: Any) -> None:
    """A drill that fails for a cause that does not prove the copy damaged (a check query
    the data fails) turns status WARNING, naming the drill, when and why, and shows in
    ``list``; a later passing drill clears it. Before: status stayed OK (a drill had passed
    within ``max_drill_age``, and the failure was not damage)."""
    backup_id = backup(ws)
    drill(ws)
    assert status(ws)[0] == 0
    ws.write_config('[drill]\nchecks = ["SELECT 1 = 0"]\n')
    assert ws.run("verify", "--drill").returncode == 1

    code, line, data = status(ws)
    assert code == 1, line
    assert f"local: restore drill of {backup_id} failed at " in line, line
    assert "check: SELECT 1 = 0: check returned [(False,)]" in line, line
    assert data["targets"][0]["newest_successful_drill"]["backup_id"] == backup_id
    entry = json.loads(ws.run("list", "--json").stdout)[0]
    assert entry["drills"]["local"]["ok"] is False
    assert "check: SELECT 1 = 0" in entry["drills"]["local"]["failed"]
    human = ws.run("list").stdout
    assert "FAILED (local)" in human and f"{backup_id} on local: restore drill of" in human

    ws.write_config("")
    drill(ws)
    assert status(ws)[0] == 0
    assert json.loads(ws.run("list", "--json").stdout)[0]["drills"]["local"]["failed"] is None


@pytest.mark.parametrize("bad", [
    '[monitoring]\nmax_backup_age = "soon"\n',   # invalid value
    '[monitoring\n',                             # invalid TOML
])
def test_status_with_a_bad_config_is_unknown(ws: Any, bad: str) -> None:
    ws.write_config(bad)

    human = ws.run("status")
    as_json = ws.run("status", "--json")

    assert human.returncode == 3 and as_json.returncode == 3
    assert human.stdout.startswith("CONEXA-BACKUP UNKNOWN - ")
    assert str(ws.config) in human.stdout
    data = json.loads(as_json.stdout)
    assert data["status"] == "UNKNOWN" and data["code"] == 3
    assert str(ws.config) in data["summary"]


def test_status_missing_config_file_is_unknown(ws: Any) -> None:
    ws.config.unlink()

    result = ws.run("status")

    assert result.returncode == 3
    assert result.stdout.startswith("CONEXA-BACKUP UNKNOWN - ")
    assert "config file not found" in result.stdout


def _unreachable_s3(port: int) -> str:
    return (f'[[targets]]\nname = "cloud"\ntype = "s3"\nbucket = "conexa-bkt"\n'
            f'endpoint_url = "http://127.0.0.1:{port}"\nretries = 1\n')


AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}


def test_status_with_a_target_that_cannot_be_listed_is_unknown(ws: Any) -> None:
    backup(ws)
    drill(ws)
    ws.write_config(_unreachable_s3(free_port()))  # nothing listens there

    result = ws.run("status", env=AWS_ENV)

    assert result.returncode == 3, result.stdout
    first = result.stdout.splitlines()[0]
    assert first.startswith("CONEXA-BACKUP UNKNOWN - cloud: target 'cloud'")
    assert "local" not in first  # the local copy is fine


def test_status_a_missing_backup_stays_critical_when_another_target_is_unreadable(
        ws: Any) -> None:
    ws.write_config(_unreachable_s3(free_port()))

    result = ws.run("status", env=AWS_ENV)

    assert "local: no complete backup" in result.stdout
    assert result.returncode == 2, result.stdout


def test_status_last_run_failed_while_a_copy_is_fresh_warns(ws: Any) -> None:
    backup_id = backup(ws)
    drill(ws)
    assert status(ws)[0] == 0

    failed_backup(ws)

    code, line, data = status(ws)
    assert code == 1
    assert line.startswith("CONEXA-BACKUP WARNING - ")
    assert "last backup run: failure" in line
    assert data["last_backup_run"]["outcome"] == "failure"
    assert "does not exist" in data["last_backup_run"]["error"]
    assert data["last_backup"]["id"] == backup_id  # the older copy still counts
    assert data["targets"][0]["status"] == "OK"


# -- Prometheus textfile ------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_PAIR = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
_LABELS = rf"\{{{_PAIR}(?:,{_PAIR})*\}}"
_VALUE = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[-+]Inf"
SAMPLE = re.compile(rf"^(?P<name>{_NAME})(?P<labels>{_LABELS})? (?P<value>{_VALUE})$")
COMMENT = re.compile(rf"^# (?P<what>HELP|TYPE) (?P<name>{_NAME}) (?P<rest>.+)$")


def parse_textfile(text: str) -> dict[str, float]:
    """Check node_exporter textfile syntax; return ``{"name{labels}": value}``."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if comment := COMMENT.match(line):
            if comment["what"] == "TYPE":
                assert comment["rest"] in ("gauge", "counter", "untyped"), line
                assert comment["name"] not in typed, f"TYPE twice: {line}"
                typed.add(comment["name"])
            continue
        sample = SAMPLE.match(line)
        assert sample, f"not textfile syntax: {line!r}"
        assert sample["name"] in typed, f"sample before its TYPE: {line}"
        key = sample["name"] + (sample["labels"] or "")
        assert key not in samples, f"duplicate sample: {line}"
        samples[key] = float(sample["value"])
    return samples


def test_metrics_textfile_after_backup_drill_and_failure(ws: Any, tmp_path: Path) -> None:
    prom_dir = tmp_path / "textfile"
    prom_dir.mkdir()
    prom = prom_dir / "conexa.prom"
    extra = f'[monitoring]\nmetrics_file = "{prom}"\n'
    ws.write_config(extra)

    backup(ws)
    drill(ws)

    assert sorted(p.name for p in prom_dir.iterdir()) == ["conexa.prom"]  # no temp file left
    assert prom.stat().st_mode & 0o777 == 0o644
    samples = parse_textfile(prom.read_text())
    assert samples['conexa_backup_last_run_success{kind="backup"}'] == 1
    assert samples['conexa_backup_last_run_success{kind="drill"}'] == 1
    assert samples['conexa_backup_drill_last_success{target="local"}'] == 1
    assert 0 < samples['conexa_backup_drill_recovery_seconds{target="local"}'] < 3600
    assert samples['conexa_backup_last_run_duration_seconds{kind="backup"}'] > 0
    assert samples["conexa_backup_last_backup_size_bytes"] > 0
    for key in ('conexa_backup_last_run_timestamp_seconds{kind="backup"}',
                'conexa_backup_last_success_timestamp_seconds{kind="backup"}',
                'conexa_backup_target_last_success_timestamp_seconds{target="local"}',
                'conexa_backup_drill_last_timestamp_seconds{target="local"}'):
        assert key in samples, key

    failed_backup(ws, extra)

    assert sorted(p.name for p in prom_dir.iterdir()) == ["conexa.prom"]
    samples = parse_textfile(prom.read_text())
    assert samples['conexa_backup_last_run_success{kind="backup"}'] == 0
    assert samples['conexa_backup_drill_last_success{target="local"}'] == 1  # unchanged
    # the last success is still the earlier backup's
    assert 'conexa_backup_last_success_timestamp_seconds{kind="backup"}' in samples


def test_metrics_timestamps_and_sizes_are_exact(ws: Any, tmp_path: Path) -> None:
    prom = tmp_path / "conexa.prom"
    ws.write_config(f'[monitoring]\nmetrics_file = "{prom}"\n')

    backup_id = backup(ws)

    samples = parse_textfile(prom.read_text())
    (run,) = json.loads((ws.state / "runs.json").read_text())["runs"]
    ended = datetime.fromisoformat(run["time"].replace("Z", "+00:00")).timestamp()
    for key in ('conexa_backup_last_run_timestamp_seconds{kind="backup"}',
                'conexa_backup_last_success_timestamp_seconds{kind="backup"}',
                'conexa_backup_target_last_success_timestamp_seconds{target="local"}'):
        assert math.isclose(samples[key], ended, abs_tol=1.0), (key, samples[key], ended)
    manifest = json.loads((ws.backups / backup_id / "manifest.json").read_text())
    size = sum(a["size"] for a in manifest["artifacts"])
    assert samples["conexa_backup_last_backup_size_bytes"] == size


def test_no_metrics_file_unless_configured(ws: Any) -> None:
    backup(ws)

    assert not list(ws.root.rglob("*.prom"))


# -- report -------------------------------------------------------------------------------------

def test_report_summarises_backups_drills_and_storage_cost(ws: Any, tmp_path: Path) -> None:
    priced = tmp_path / "priced"
    extra = (f'[[targets]]\nname = "priced"\ntype = "local"\npath = "{priced}"\n'
             "price_per_gb_month = 250000.0\n"
             '[monitoring]\ncurrency = "US$"\n')
    ws.write_config(extra)
    backup_id = backup(ws)
    failed_backup(ws, extra)

    before = ws.run("report", "--days", "7", "--json")
    assert before.returncode == 0, before.stderr
    early = json.loads(before.stdout)
    assert early["drills"]["runs"] == 0
    assert early["rto"]["met"] is False  # no passing drill yet

    drill(ws)
    result = ws.run("report", "--days", "7", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["period_days"] == 7
    assert report["sent"] == []
    b = report["backups"]
    assert (b["runs"], b["success"], b["partial"], b["failure"]) == (2, 1, 0, 1)
    assert len(b["failures"]) == 1 and "does not exist" in b["failures"][0]["error"]
    manifest = json.loads((ws.backups / backup_id / "manifest.json").read_text())
    assert b["sizes"] == [{"id": backup_id,
                           "bytes": sum(a["size"] for a in manifest["artifacts"])}]
    d = report["drills"]
    assert (d["runs"], d["passed"], d["failed"]) == (1, 1, 0)
    rec = d["recovery_seconds"]
    assert 0 < rec["min"] <= rec["median"] <= rec["max"] < 3600
    assert report["rpo"]["met"] is True
    assert report["rpo"]["objective_seconds"] == 26 * 3600
    assert 0 <= report["rpo"]["largest_gap_seconds"] < 300
    assert report["rto"]["objective_seconds"] == 3600.0 and report["rto"]["met"] is True
    assert report["rto"]["last_drill"]["ok"] is True
    assert report["rto"]["last_drill"]["recovery_seconds"] == rec["max"]
    storage = {s["target"]: s for s in report["storage"]}
    assert set(storage) == {"local", "priced"}
    assert storage["local"]["bytes"] == folder_bytes(ws.backups)  # includes drill.json
    assert storage["priced"]["bytes"] == folder_bytes(priced)
    assert storage["local"]["monthly_cost"] is None
    cost = round(storage["priced"]["bytes"] / 1e9 * 250000.0, 2)
    assert cost > 0
    assert storage["priced"]["monthly_cost"] == cost
    assert report["monthly_cost"] == cost
    assert report["currency"] == "US$"

    human = ws.run("report", "--days", "7")
    assert human.returncode == 0
    assert "backups: 2 runs, 1 ok, 0 partial, 1 failed" in human.stdout
    assert f"estimated storage cost: US$ {cost:.2f}/month" in human.stdout


def test_report_rpo_not_met_when_the_newest_backup_is_old(ws: Any) -> None:
    ws.write_config('[monitoring]\nmax_backup_age = "1h"\n')
    backup_id = backup(ws)
    age_backup(ws, backup_id, timedelta(hours=3))

    result = ws.run("report", "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rpo"]["met"] is False
    assert report["rpo"]["largest_gap_seconds"] >= 3 * 3600


def test_a_backup_damaged_everywhere_closes_no_gap_in_report_or_charts(ws: Any) -> None:
    """One rule for the RPO (monitor.backup_gaps over restorable backups): the report's
    verdict and the gap chart both skip a backup found damaged on every copy."""
    ws.write_config('[monitoring]\nmax_backup_age = "4h"\n')
    first = backup(ws)
    age_backup(ws, first, timedelta(hours=5))
    second = backup(ws)
    age_backup(ws, second, timedelta(hours=2))
    assert json.loads(ws.run("report", "--json").stdout)["rpo"]["met"] is True  # 3 h, 2 h
    dump = ws.backups / second / "database.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-64])
    assert ws.run("verify").returncode != 0  # found damaged, recorded

    report = json.loads(ws.run("report", "--json").stdout)
    assert report["rpo"]["met"] is False
    assert report["rpo"]["largest_gap_seconds"] >= 5 * 3600  # open since the first
    h = history(Context(load_config(ws.config)[0]), 7)
    assert max(p.value for p in h.gaps[0].points) >= 5 * 3600
    assert len(h.gaps[0].points) == 1  # only the gap still open


def test_the_rto_is_the_newest_drills_word(ws: Any) -> None:
    """A drill that failed after one that passed: the RTO is not met (report and page)."""
    backup(ws)
    drill(ws)
    assert json.loads(ws.run("report", "--json").stdout)["rto"]["met"] is True
    listed = json.loads(ws.run("list", "--json").stdout)
    newest = max(b["id"] for b in listed)
    dump = ws.backups / newest / "database.dump.zst"
    dump.write_bytes(dump.read_bytes()[:-64])
    assert ws.run("verify", "--drill").returncode != 0

    report = json.loads(ws.run("report", "--json").stdout)
    assert report["drills"]["passed"] == 1 and report["drills"]["failed"] == 1
    assert report["rto"]["met"] is False and report["rto"]["last_drill"]["ok"] is False
    assert "RTO (objective 1 h 0 min): NOT MET (the newest drill failed" in ws.run("report").stdout


def test_report_send_goes_to_notifiers_taking_reports(ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    ws.write_config(
        f'[[notify]]\ntype = "webhook"\nurl = "{httpserver.url_for("/hook")}"\n'
        'events = ["report"]\n'
        f'[[notify]]\ntype = "slack"\nwebhook_url = "{httpserver.url_for("/slack")}"\n')
    backup(ws)

    result = ws.run("report", "--send", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sent"] == [
        {"notifier": "webhook", "ok": True, "detail": "sent"}]
    httpserver.check_assertions()  # nothing reached the slack notifier (failures only)
    (request,) = [r for r, _ in httpserver.log]
    assert request.path == "/hook"
    event = request.get_json()
    assert event["schema"] == "conexa-backup/event/v1"
    assert (event["kind"], event["outcome"]) == ("report", "success")
    assert event["title"] == "conexa-backup report, last 7 days"
    assert "backups: 1 runs, 1 ok" in event["body"]
    assert "RPO:" in event["body"] and "RTO" in event["body"]


def test_report_send_without_a_report_notifier_goes_to_every_notifier(
        ws: Any, httpserver: HTTPServer) -> None:
    httpserver.expect_request("/s", method="POST").respond_with_data("ok")
    ws.write_config(f'[[notify]]\ntype = "slack"\nwebhook_url = "{httpserver.url_for("/s")}"\n')
    ws.config.chmod(0o600)

    result = ws.run("report", "--send", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sent"] == [
        {"notifier": "slack", "ok": True, "detail": "sent"}]
    (request,) = [r for r, _ in httpserver.log]
    assert "*conexa-backup report, last 7 days*" in request.get_json()["text"]
    httpserver.check_assertions()


# -- damaged copies: every signal shows what verify, drills and restores found --------------------

def _flip_middle_byte(path: Path) -> bytes:
    """Corrupt a stored object in place (same size); return the original bytes."""
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return original


def _signals(ws: Any, prom: Path) -> tuple[dict[str, Any], int, dict[str, Any], float,
                                            dict[str, Any], str]:
    """(list entry by id, status code, status JSON, damaged-copies gauge, report JSON,
    report text) as the CLI shows them now."""
    listing = {b["id"]: b for b in json.loads(ws.run("list", "--json").stdout)}
    code, _, data = status(ws)
    samples = parse_textfile(prom.read_text())
    report = ws.run("report", "--json")
    text = ws.run("report")
    assert report.returncode == 0 and text.returncode == 0, report.stderr + text.stderr
    return (listing, code, data, samples['conexa_backup_target_damaged_copies{target="local"}'],
            json.loads(report.stdout), text.stdout)


def test_a_copy_that_failed_verify_or_a_drill_is_damaged_everywhere_until_it_passes(
        ws: Any, tmp_path: Path) -> None:
    prom = tmp_path / "conexa.prom"
    ws.write_config(f'[monitoring]\nmetrics_file = "{prom}"\n')
    good = backup(ws)
    drill(ws)
    bad = backup(ws)
    drill(ws)
    assert status(ws)[0] == 0
    dump = ws.backups / bad / "database.dump.zst"
    original = _flip_middle_byte(dump)

    verify = ws.run("verify", "latest")
    assert verify.returncode == 1 and "SHA-256" in verify.stdout, verify.stdout

    listing, code, data, gauge, report, text = _signals(ws, prom)
    entry = listing[bad]
    assert entry["status"] == "damaged" and entry["targets"] == []
    damage = entry["damaged_targets"]["local"]
    assert damage["why"].startswith("verify: ") and "SHA-256" in damage["why"]
    assert damage["at"] and damage["at"].endswith("Z")
    assert listing[good]["status"] == "complete" and listing[good]["targets"] == ["local"]
    human = ws.run("list")
    assert f"{bad} on local: damaged since" in human.stdout, human.stdout
    # WARNING: the target still has a good copy within max_backup_age (the older one).
    assert code == 1 and data["status"] == "WARNING", data
    target = data["targets"][0]
    assert target["newest_backup"] == good
    assert [d["id"] for d in target["damaged"]] == [bad]
    assert any(p.startswith(f"{bad} damaged since ") for p in target["problems"]), target
    assert data["last_backup"]["id"] == good
    assert gauge == 1
    assert [(d["id"], d["target"]) for d in report["damaged"]] == [(bad, "local")]
    assert f"DAMAGED: {bad} on local" in text

    # A drill of that copy fails: still damaged, now for the drill's reason.
    failed = ws.run("verify", "--drill", bad, "--json")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    listing, code, data, gauge, _, _ = _signals(ws, prom)
    assert listing[bad]["damaged_targets"]["local"]["why"].startswith("drill: fetch database: ")
    assert code == 1 and gauge == 1

    # CRITICAL once the only good copy is older than max_backup_age.
    age_backup(ws, good, timedelta(days=2))
    code, line, data = status(ws)
    assert code == 2 and "local: newest good backup older than 26h" in line, line

    # The stored bytes are repaired (say, copied back from another disk): a verify that passes
    # clears the damage everywhere.
    dump.write_bytes(original)
    assert ws.run("verify", bad).returncode == 0
    listing, code, data, gauge, report, text = _signals(ws, prom)
    assert listing[bad]["status"] == "complete" and listing[bad]["damaged_targets"] == {}
    assert data["targets"][0]["damaged"] == [] and data["targets"][0]["newest_backup"] == bad
    assert gauge == 0 and report["damaged"] == [] and "DAMAGED" not in text
    # The failed drill is still said (a verify is not a drill) until a drill passes.
    assert code == 1 and f"restore drill of {bad} failed at " in data["summary"], data
    drill(ws)
    assert status(ws)[0] == 0


def test_a_target_whose_only_copies_are_damaged_is_critical(ws: Any) -> None:
    only = backup(ws)
    drill(ws)
    _flip_middle_byte(ws.backups / only / "database.dump.zst")
    assert ws.run("verify", "latest").returncode == 1

    code, line, data = status(ws)
    assert code == 2, line
    assert "local: no good backup" in line
    assert data["targets"][0]["newest_backup"] is None
    assert data["last_backup"] is None


def test_a_restore_that_falls_back_from_a_corrupt_copy_marks_it_damaged(ws: Any) -> None:
    second = ws.root / "second"
    ws.write_config(f'[[targets]]\nname = "second"\ntype = "local"\npath = "{second}"\n')
    backup_id = backup(ws)
    _flip_middle_byte(ws.backups / backup_id / "database.dump.zst")

    out = ws.root / "downloaded"
    fetched = ws.run("download", backup_id, "--to", str(out))
    assert fetched.returncode == 0, fetched.stderr  # from the copy on "second"

    entry = next(b for b in json.loads(ws.run("list", "--json").stdout) if b["id"] == backup_id)
    assert entry["targets"] == ["second"]
    assert "SHA-256" in entry["damaged_targets"]["local"]["why"]
    code, _, data = status(ws)
    by_target = {t["target"]: t for t in data["targets"]}
    assert [d["id"] for d in by_target["local"]["damaged"]] == [backup_id]
    assert by_target["second"]["damaged"] == []
    # "local" holds no good copy at all: CRITICAL, though "second" still has one.
    assert code == 2 and by_target["local"]["status"] == "CRITICAL"
    assert by_target["second"]["newest_backup"] == backup_id


def test_the_damage_record_is_cleared_by_a_pass_forgotten_with_the_copy_and_never_lost(
        tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from conexa_backup.state import checks, forget_copies, record_damaged, record_verified

    record_verified(tmp_path, "20261201T000000Z", "local")
    record_damaged(tmp_path, "20261202T000000Z", "local", "verify: SHA-256 differs")
    seen = checks(tmp_path)
    assert seen.damage("20261202T000000Z", "local").why == "verify: SHA-256 differs"
    assert seen.damage("20261202T000000Z", "s3") is None
    assert seen.newest_passed("local") == "20261201T000000Z"
    record_verified(tmp_path, "20261202T000000Z", "local")  # a later pass clears it
    assert checks(tmp_path).damage("20261202T000000Z", "local") is None
    assert checks(tmp_path).newest_passed("local") == "20261202T000000Z"
    record_damaged(tmp_path, "20261202T000000Z", "local", "drill: restore database: boom")
    assert checks(tmp_path).newest_passed("local") == "20261201T000000Z"  # damaged since
    forget_copies(tmp_path, [("20261202T000000Z", "local")])
    assert checks(tmp_path).damaged == {}
    assert (tmp_path / "damaged.json").stat().st_mode & 0o777 == 0o600

    # Concurrent writers (a verify beside a drill beside a restore) lose no record.
    ids = [f"202612{d:02d}T000000Z" for d in range(1, 29)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: record_damaged(tmp_path, i, "s3", "bad"), ids))
    assert {i for i, t in checks(tmp_path).damaged if t == "s3"} == set(ids)


# -- stored with problems: warnings and suspect uploads show in every signal --------------------

def test_a_backup_of_an_empty_uploads_folder_shows_in_list_status_metrics_and_report(
        ws: Any, tmp_path: Path) -> None:
    """Before: ``list`` said ``complete`` and nothing else, ``status`` stayed green (after a
    drill), and neither the metrics nor the report said a word."""

    prom = tmp_path / "conexa.prom"
    ws.write_config(f'[monitoring]\nmetrics_file = "{prom}"\n')
    good = backup(ws)
    drill(ws)
    assert status(ws)[0] == 0
    shutil.rmtree(ws.uploads)
    ws.uploads.mkdir()  # the volume is not mounted
    run = ws.run("backup")
    assert run.returncode == 3, run.stderr
    suspect = run.stdout.strip().splitlines()[-1]

    listing = {b["id"]: b for b in json.loads(ws.run("list", "--json").stdout)}
    entry = listing[suspect]
    assert entry["status"] == "complete"  # unchanged for existing consumers
    assert len(entry["warnings"]) == 1 and "is empty" in entry["warnings"][0]
    assert "is empty" in entry["suspect"] and entry["uploads_skipped"] == 0
    assert (listing[good]["warnings"], listing[good]["suspect"]) == ([], None)
    human = ws.run("list").stdout
    assert "complete (suspect, 1 warning)" in human, human
    assert f"{suspect}: warning: " in human and "is empty" in human, human
    assert human.count(f"{suspect}: warning: ") == 1, human  # the reason said once

    code, line, data = status(ws)
    assert code == 1 and data["status"] == "WARNING", data
    assert f"local: newest backup {suspect}: uploads suspect: " in line, line
    assert data["last_backup"]["id"] == good  # the newest trusted backup, as for the age

    samples = parse_textfile(prom.read_text())
    assert samples["conexa_backup_last_backup_warnings"] == 1
    report = ws.run("report", "--json")
    assert report.returncode == 0, report.stderr
    with_warnings = json.loads(report.stdout)["backups"]["with_warnings"]
    assert [w["id"] for w in with_warnings] == [suspect]
    assert f"{suspect} stored with 1 warning(s): " in ws.run("report").stdout

    ws.uploads.rmdir()  # the volume is back: a clean backup clears it all
    make_uploads_tree(ws.uploads, files=20, seed=3)
    assert ws.run("backup", "--accept-shrink").returncode == 0
    assert parse_textfile(prom.read_text())["conexa_backup_last_backup_warnings"] == 0
    assert "uploads suspect" not in status(ws)[1]


def test_a_damaged_copy_deleted_outside_the_tool_leaves_the_gauge(ws: Any, tmp_path: Path) -> None:
    """Before: damaged.json kept the deleted copy, and the gauge counted it forever."""

    prom = tmp_path / "conexa.prom"
    ws.write_config(f'[monitoring]\nmetrics_file = "{prom}"\n')
    backup(ws)
    bad = backup(ws)
    _flip_middle_byte(ws.backups / bad / "database.dump.zst")
    assert ws.run("verify", bad).returncode == 1
    assert parse_textfile(prom.read_text())[
        'conexa_backup_target_damaged_copies{target="local"}'] == 1

    shutil.rmtree(ws.backups / bad)  # an operator cleans up by hand
    backup(ws)  # any run lists the target, then writes the metrics
    assert parse_textfile(prom.read_text())[
        'conexa_backup_target_damaged_copies{target="local"}'] == 0
    assert not (ws.state / "damaged.json").exists() or \
        bad not in json.loads((ws.state / "damaged.json").read_text())
