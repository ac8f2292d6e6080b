"""The systemd timers offered beside crontab.example (examples/systemd/, issue 18)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "examples" / "systemd"
JOBS = {  # timer -> (what crontab.example runs, its OnCalendar)
    "conexa-backup": ("backup", "*-*-* 00:00:00"),
    "conexa-backup-verify": ("verify latest", "*-*-* 06:30:00"),
    "conexa-backup-drill": ("verify --drill latest --all-targets", "Sun *-*-* 02:00:00"),
    "conexa-backup-report": ("report --days 7 --send", "Mon *-*-* 08:00:00"),
}


def _keys(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines()
                if "=" in line and not line.startswith("#"))


def test_each_job_of_crontab_example_has_a_timer_and_a_service() -> None:
    crontab = (REPO / "crontab.example").read_text()
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(
        f"{name}.{kind}" for name in JOBS for kind in ("service", "timer"))
    for name, (args, when) in JOBS.items():
        service, timer = _keys(UNITS / f"{name}.service"), _keys(UNITS / f"{name}.timer")
        assert service["ExecStart"] == f"/usr/local/bin/conexa-backup --quiet {args}"
        assert f"conexa-backup --quiet {args}\n" in crontab  # the same job as under cron
        assert service["Type"] == "oneshot"
        assert service["Environment"] == "CONEXA_BACKUP_CONFIG=/etc/conexa-backup/backup.toml"
        assert (timer["OnCalendar"], timer["Persistent"]) == (when, "true")
        assert timer["RandomizedDelaySec"] and timer["WantedBy"] == "timers.target"
        for key, value in {"ProtectSystem": "strict", "PrivateTmp": "yes",
                           "NoNewPrivileges": "yes", "UMask": "0077",
                           "StateDirectory": "conexa-backup"}.items():
            assert service[key] == value, (name, key)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_units_pass_systemd_analyze(tmp_path: Path) -> None:
    """``verify`` checks every key, the calendar specs, and that ExecStart's program exists:
    a stand-in for the one the README's Install puts in /usr/local/bin."""
    stand_in = tmp_path / "conexa-backup"
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace(
            "/usr/local/bin/conexa-backup", str(stand_in)))
    units = sorted(str(p) for p in tmp_path.iterdir() if p.suffix in (".service", ".timer"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                            capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "SYSTEMD_LOG_TARGET": "console",
                                 "SYSTEMD_LOG_LEVEL": "notice"})
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and "conexa-backup" not in output, output
    for name in JOBS:  # systemd's own score of each sandbox: "OK" is below 4
        result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                                 str(tmp_path / f"{name}.service")],
                                capture_output=True, text=True, timeout=60, check=False)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
        assert found and float(found.group(1)) < 4.0, result.stdout[-2000:]
