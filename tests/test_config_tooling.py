"""`config validate` and `config show` (issue 18), and the grouped `--help`.

Nothing here connects to anything: the config names a database and a bucket nobody serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

CONFIG = """\
state_dir = "{root}/state"
[database]
url = "postgresql://backup:s3cret-pw@db.invalid:5432/conexa"
[[targets]]
name = "local"
type = "local"
path = "{root}/backups"
[[targets]]
name = "offsite"
type = "s3"
bucket = "${{BUCKET}}"
secret_access_key = "${{AWS_SECRET}}"
access_key_id = "AKIAEXAMPLE"
[[notify]]
type = "webhook"
url = "https://hooks.invalid/x?token=hook-token"
headers = {{ "X-Api-Key" = "header-secret" }}
"""
SECRETS = ("s3cret-pw", "top-secret-key", "hook-token", "header-secret")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CONEXA_", "BACKUP_"))}
    return subprocess.run([sys.executable, "-m", "conexa_backup", *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, check=False, timeout=60)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "backup.toml"
    path.write_text(CONFIG.format(root=tmp_path), encoding="utf-8")
    path.chmod(0o600)
    return path


ENV = {"BUCKET": "school-backups", "AWS_SECRET": "top-secret-key",
       "BACKUP_RETENTION_DAYS": "10"}


def test_validate_says_valid_or_exits_2_with_the_reason(tmp_path: Path) -> None:
    path = _config(tmp_path)
    ok = _run("config", "validate", str(path), env=ENV)
    assert ok.returncode == 0 and ok.stdout.strip() == f"{path}: valid", ok.stderr
    assert _run("-q", "config", "validate", str(path), env=ENV).stdout == ""
    unset = _run("config", "validate", str(path), env={"AWS_SECRET": "x"})
    assert unset.returncode == 2
    assert "targets.1.bucket: environment variable ${BUCKET} is not set" in unset.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text(path.read_text().replace('type = "local"', 'type = "floppy"'))
    bad = _run("config", "validate", str(broken), env=ENV)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "targets.0.type (line 6): unknown target type" in bad.stderr
    # Without a path: the file every command reads (--config here).
    assert _run("--config", str(path), "config", "validate", env=ENV).returncode == 0
    assert _run("config", "validate", str(tmp_path / "none.toml")).returncode == 2


def test_show_prints_the_config_in_effect_with_origins_and_no_secret(tmp_path: Path) -> None:
    path = _config(tmp_path)
    shown = _run("--config", str(path), "config", "show", env=ENV)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for secret in SECRETS:
        assert secret not in text
    doc = tomllib.loads(text)  # what it prints is TOML
    assert doc["database"]["url"] == "postgresql://backup:********@db.invalid:5432/conexa"
    assert doc["database"]["jobs"] == 2  # a default, filled in
    offsite = doc["targets"][1]
    assert offsite["bucket"] == "school-backups" and offsite["secret_access_key"] == "********"
    assert doc["notify"][0]["url"] == "********"
    assert doc["notify"][0]["headers"] == {"X-Api-Key": "********"}
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line}
    assert lines["jobs"].endswith("# default")
    assert lines["keep_within"].endswith("# from the environment (a seed variable: see `check`)")
    assert lines["bucket"].endswith("# from the file, with its ${VAR}s from the environment")
    assert lines["access_key_id"].endswith("# from the file")
    # Global options after the sub-command's name work here too.
    quiet = tmp_path / "no-notify.toml"
    quiet.write_text(path.read_text().split("[[notify]]")[0], encoding="utf-8")
    quiet.chmod(0o600)
    plain = _run("config", "show", "--config", str(quiet), env=ENV)
    assert "notify = []  # default" in plain.stdout.splitlines(), plain.stdout
    as_json = _run("--config", str(path), "config", "show", "--json", env=ENV)
    data = json.loads(as_json.stdout)
    assert data["retention"]["keep_within"] == "10d" and data["targets"][1]["retries"] == 6
    assert not any(secret in as_json.stdout for secret in SECRETS)


def test_help_groups_the_commands_as_a_sysadmin_thinks_of_them() -> None:
    text = _run("--help").stdout
    panels = ["Every day", "Recovery", "Maintenance", "Setting up", "The admin panel's API"]
    found = [p for p in panels if f"─ {p} " in text]
    assert found == panels
    sections = {p: text.split(f"─ {p} ")[1].split("╰")[0] for p in panels}
    words = {p: {line.split()[1] for line in sections[p].splitlines()[1:]
                 if len(line.split()) > 1 and line.split()[1][0].isalpha()
                 and line.split()[1].islower()} for p in panels}
    assert {"backup", "list", "status"} <= words["Every day"]
    assert {"restore", "download", "verify"} <= words["Recovery"]
    assert {"prune", "delete"} <= words["Maintenance"]
    assert {"init", "check", "config", "notify-test"} <= words["Setting up"]
    assert "serve" in words["The admin panel's API"]
