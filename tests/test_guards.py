"""Guards against quiet loss: private state, a shrunken uploads folder, an unmounted backup
disk, and a table lock that would hold the nightly dump forever (issue 13, §2 and §4).

The CLI runs as a real subprocess, so umask, exit codes and stderr are what cron sees.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

from tests.test_failures import backup_ok, cli_argv

# -- state_dir is private, whichever command runs first ---------------------------------------

FIRST_COMMANDS: list[tuple[str, ...]] = [
    ("list",), ("list", "--json"), ("status",), ("check",), ("report",), ("prune", "--dry-run"),
    ("verify", "latest"), ("verify", "--drill", "latest"), ("download", "latest", "--to", "{out}"),
    ("notify-test",), ("prune",), ("backup",), ("restore", "latest", "--yes"),
]


def _not_private(root: Path) -> list[str]:
    """Everything under ``root`` (itself included) that is not a 0700 folder or 0600 file."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        if stat.S_IMODE(st.st_mode) != want:
            wrong.append(f"{path.relative_to(root.parent)} {oct(stat.S_IMODE(st.st_mode))}")
    return wrong


def test_state_dir_is_private_whichever_command_runs_first(ws: Any, tmp_path: Path) -> None:
    """Under umask 022, each command run first on a fresh (and not yet existing, two levels
    deep) state_dir leaves only 0700 folders and 0600 files there: ``state_dir`` itself,
    ``cache/manifests/<target>``, ``logs/``, ``staging/``, ``drills/``."""
    backup_ok(ws)  # the target holds a backup, so that list/verify/... have manifests to cache
    config = ws.config.read_text(encoding="utf-8")
    wrong: dict[str, list[str]] = {}
    for i, command in enumerate(FIRST_COMMANDS):
        fresh = tmp_path / f"fresh-{i}"
        ws.config.write_text(config.replace(f'state_dir = "{ws.state}"',
                                            f'state_dir = "{fresh / "state"}"'), encoding="utf-8")
        argv = [a.format(out=tmp_path / f"out-{i}") for a in command]
        proc = subprocess.run(cli_argv(ws, *argv), capture_output=True, text=True, timeout=180,
                              stdin=subprocess.DEVNULL, umask=0o022, check=False)
        assert (fresh / "state").is_dir(), f"{command}: {proc.returncode} {proc.stderr}"
        if _not_private(fresh):
            wrong[" ".join(command)] = _not_private(fresh)
    assert wrong == {}
