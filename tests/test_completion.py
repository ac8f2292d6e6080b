"""Shell completion (issue 18): backup ids from the manifest cache, target names from the
config, never a call to a target (the S3 target below points at a port nobody serves)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conexa_backup.testing.cluster import free_port

PROGRAM = Path(sys.executable).parent / "conexa-backup"  # the console script bash calls


def _complete(*words: str, env: dict[str, str] | None = None) -> list[str]:
    line = ["conexa-backup", *words]
    result = subprocess.run([str(PROGRAM)], capture_output=True, text=True, timeout=30,
                            check=True, env={**os.environ, **(env or {}),
                                             "_CONEXA_BACKUP_COMPLETE": "complete_bash",
                                             "COMP_WORDS": " ".join(line),
                                             "COMP_CWORD": str(len(line) - 1)})
    return result.stdout.split()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "backup.toml"
    path.write_text(f"""state_dir = "{tmp_path}/state"
[database]
url = "postgresql://x@127.0.0.1:{free_port()}/conexa"
[[targets]]
name = "local"
type = "local"
path = "{tmp_path}/backups"
[[targets]]
name = "offsite"
type = "s3"
bucket = "conexa-backups"
endpoint_url = "http://127.0.0.1:{free_port()}"
""", encoding="utf-8")
    path.chmod(0o600)
    for target, backup_id in (("local", "20261201T000000Z"), ("offsite", "20261203T000000Z"),
                              ("local", "20261202T000000Z")):
        entry = tmp_path / "state" / "cache" / target / f"{backup_id}.entry.json"
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text("{}", encoding="utf-8")
    return path


def test_backup_ids_and_target_names_complete_from_what_is_here(tmp_path: Path) -> None:
    config = str(_config(tmp_path))
    started = time.monotonic()
    assert _complete("-c", config, "restore", "") == [
        "latest", "20261203T000000Z", "20261202T000000Z", "20261201T000000Z"]
    assert _complete("-c", config, "verify", "20261202") == ["20261202T000000Z"]
    assert _complete("-c", config, "delete", "2026120") == [
        "20261203T000000Z", "20261202T000000Z", "20261201T000000Z"]
    assert _complete("list", "--target", "o", env={"CONEXA_BACKUP_CONFIG": config}) == [
        "offsite"]
    assert _complete("-c", config, "download", "latest", "--from", "") == ["local", "offsite"]
    assert time.monotonic() - started < 20  # nothing waited on a target
    # No config: nothing to complete, and no error on the user's terminal.
    assert _complete("-c", str(tmp_path / "missing.toml"), "restore", "") == ["latest"]


def test_completion_scripts_are_offered_for_the_shells() -> None:
    help_text = subprocess.run([str(PROGRAM), "--help"], capture_output=True, text=True,
                               check=True, timeout=30).stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    script = subprocess.run([str(PROGRAM), "--show-completion", "bash"], capture_output=True,
                            text=True, check=True, timeout=30).stdout
    assert "_CONEXA_BACKUP_COMPLETE=complete_bash" in script
    assert "complete " in script and "conexa-backup" in script
