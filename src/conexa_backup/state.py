"""Small records kept in ``state_dir``: which backups passed verification, and when.

Written atomically (temporary file, fsync, rename), mode 0600. Losing them loses no data: they
only protect more backups from pruning and feed status reports.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conexa_backup.manifest import id_sort_key

VERIFIED = "verified.json"
DRILLS = "drills.json"
KEEP_DRILLS = 500


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: Any) -> None:
    """Replace ``path`` atomically with ``data`` as JSON (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def record_verified(state_dir: Path, backup_id: str, target: str,
                    when: datetime | None = None) -> None:
    """Remember that ``backup_id`` on ``target`` passed verification."""
    path = state_dir / VERIFIED
    data = _read(path)
    data.setdefault(backup_id, {})[target] = (when or datetime.now(UTC)).isoformat()
    write_json(path, data)


def verified(state_dir: Path) -> dict[str, dict[str, str]]:
    """backup id -> {target: ISO time of its last successful verification}."""
    return _read(state_dir / VERIFIED)


def newest_verified(state_dir: Path) -> str | None:
    """The newest backup id that passed verification on any target."""
    ids = [i for i, targets in verified(state_dir).items() if targets]
    return max(ids, key=id_sort_key) if ids else None


def record_drill(state_dir: Path, result: dict[str, Any]) -> None:
    """Append a drill result (``DrillResult.to_dict()``); the newest ``KEEP_DRILLS`` are kept."""
    path = state_dir / DRILLS
    history = _read(path).get("drills", [])
    history.append(result)
    write_json(path, {"drills": history[-KEEP_DRILLS:]})
    if result.get("ok"):
        record_verified(state_dir, str(result["backup_id"]), str(result["target"]))


def drills(state_dir: Path) -> list[dict[str, Any]]:
    """Recorded drill results, oldest first."""
    found = _read(state_dir / DRILLS).get("drills", [])
    return [d for d in found if isinstance(d, dict)]


def last_drills(state_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(backup id, target) -> the newest drill result of that copy."""
    return {(str(d.get("backup_id")), str(d.get("target"))): d for d in drills(state_dir)}


RUNS = "runs.json"
KEEP_RUNS = 2000


def record_run(state_dir: Path, run: dict[str, Any]) -> None:
    """Append one run's outcome (an event's JSON); the newest ``KEEP_RUNS`` are kept."""
    path = state_dir / RUNS
    history = _read(path).get("runs", [])
    history.append(run)
    write_json(path, {"runs": history[-KEEP_RUNS:]})


def runs(state_dir: Path) -> list[dict[str, Any]]:
    """Recorded runs, oldest first."""
    found = _read(state_dir / RUNS).get("runs", [])
    return [r for r in found if isinstance(r, dict)]
