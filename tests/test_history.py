"""The history the status page and the HTML report draw (issue 16), from backups, a failed
run and a drill made by the real CLI: one point per run, failures marked, the objectives
from the config."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

from conexa_backup.actions.context import Context
from conexa_backup.actions.history import history
from conexa_backup.charts import Unit, time_chart
from conexa_backup.config.loading import load_config

MISSING_DB = "conexa_no_such_database"


def backup(ws: Any) -> str:
    result = ws.run("backup", "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["id"])


def test_one_point_per_run_with_failures_marked(ws: Any) -> None:
    ws.write_config('[monitoring]\nmax_backup_age = "30h"\n[drill]\nrto_objective = "45m"\n')
    first = backup(ws)
    ws.write_config('[monitoring]\nmax_backup_age = "30h"\n[drill]\nrto_objective = "45m"\n',
                    database=MISSING_DB)
    assert ws.run("backup").returncode == 1
    ws.write_config('[monitoring]\nmax_backup_age = "30h"\n[drill]\nrto_objective = "45m"\n')
    second = backup(ws)
    drilled = ws.run("verify", "--drill", "--json")
    assert drilled.returncode == 0, drilled.stderr

    now = datetime.now(UTC)
    h = history(Context(load_config(ws.config)[0]), 7, now)
    assert (h.rto_seconds, h.rpo_seconds) == (45 * 60, 30 * 3600)
    assert h.end == now and h.start == now - timedelta(days=7)
    database, uploads = h.sizes
    assert [p.label for p in database.points] == [first, second]
    assert [p.label for p in uploads.points] == [first, second]
    manifest = json.loads((ws.backups / second / "manifest.json").read_text())
    dump = sum(a["size"] for a in manifest["artifacts"] if a["kind"] in ("database", "globals"))
    assert database.points[1].value == dump > 0
    assert uploads.points[1].value == manifest["uploads"]["bytes"] > 0
    runs = h.durations[0].points
    assert [p.failed for p in runs] == [False, True, False]
    assert [p.label for p in runs] == [first, "failed", second]
    assert all(p.value > 0 for p in runs)  # a failed run's time is recorded too
    (drill,) = h.recovery[0].points
    assert not drill.failed and 0 < drill.value < 45 * 60 and second in drill.label
    gap, still_open = h.gaps[0].points
    assert 0 < gap.value < 600 and still_open.at == now and "open" in still_open.label

    # Drawn: a marker per run, the failed one a cross.
    svg = ET.fromstring(time_chart("Duration", h.durations, unit=Unit.SECONDS,  # noqa: S314
                                   start=h.start, end=h.end))
    kinds = [e.tag.rsplit("}", 1)[-1] for e in svg.iter()
             if "point" in e.get("class", "").split()]
    assert kinds == ["circle", "path", "circle"]


def test_a_period_before_any_backup_is_empty_but_keeps_its_objectives(ws: Any) -> None:
    backup(ws)
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    h = history(Context(load_config(ws.config)[0]), 30, long_ago)
    drawn = time_chart("Size", h.sizes, unit=Unit.BYTES, start=h.start, end=h.end)
    assert "No data in this period" in drawn
    assert h.rpo_seconds > 0 and h.rto_seconds > 0
