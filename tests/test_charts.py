"""Server-drawn SVG charts (issue 16): one marker per point, objectives drawn and labelled,
failure told by shape and words, text escaped, and a document any XML parser reads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from conexa_backup.charts import Point, Series, Unit, Words, fmt, time_chart

NS = {"svg": "http://www.w3.org/2000/svg"}
END = datetime(2026, 12, 6, tzinfo=UTC)
START = END - timedelta(days=30)


def day(n: int, value: float, **kw: object) -> Point:
    return Point(START + timedelta(days=n), value, **kw)  # type: ignore[arg-type]


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 - our own output, under test


def markers(root: ET.Element) -> list[ET.Element]:
    return [e for e in root.iter() if "point" in e.get("class", "").split()]


def test_one_marker_per_point_in_the_period_and_the_line_in_time_order() -> None:
    points = [day(20, 5e9), day(2, 3e9), day(-1, 9e9), day(31, 9e9), day(10, 4e9)]
    root = parse(time_chart("Size", [Series("database", points)], unit=Unit.BYTES,
                            start=START, end=END))
    assert len(markers(root)) == 3  # the two outside the 30 days are left out
    line = root.find(".//svg:polyline", NS)
    assert line is not None
    xs = [float(pair.split(",")[0]) for pair in line.get("points", "").split()]
    assert xs == sorted(xs) and len(xs) == 3
    tips = [m.findtext("svg:title", namespaces=NS) for m in markers(root)]
    assert tips[0] is not None and "database" in tips[0] and "3 GB" in tips[0]


def test_values_are_drawn_to_scale_from_zero() -> None:
    root = parse(time_chart("Size", [Series("s", [day(1, 0.0), day(2, 100.0)])],
                            unit=Unit.COUNT, start=START, end=END, height=220))
    low, high = (float(m.get("cy", "0")) for m in markers(root))
    grid = sorted(float(g.get("y1", "0")) for g in root.iter()
                  if g.get("class") == "grid")
    assert low == grid[-1]  # zero sits on the bottom grid line
    assert grid[0] <= high < low  # the largest value is inside the plot, above zero


def test_the_objective_is_a_labelled_dashed_line_inside_the_plot() -> None:
    rto = 3600.0
    root = parse(time_chart("Drill recovery", [Series("drills", [day(3, 250.0)])],
                            unit=Unit.SECONDS, start=START, end=END, objective=rto,
                            objective_label="RTO 1 h"))
    line = next(e for e in root.iter() if e.get("class") == "objective")
    label = next(e for e in root.iter() if e.get("class") == "objective-label")
    assert line.get("stroke-dasharray") and label.text == "RTO 1 h"
    grid = sorted(float(g.get("y1", "0")) for g in root.iter() if g.get("class") == "grid")
    assert grid[0] <= float(line.get("y1", "-1")) < grid[-1]  # the axis reaches past it
    marker = markers(root)[0]
    assert float(marker.get("cy", "0")) > float(line.get("y1", "0"))  # 250 s: under the line
    desc = root.findtext("svg:desc", namespaces=NS) or ""
    assert "Objective: RTO 1 h" in desc


def test_a_failed_point_is_a_cross_and_says_so() -> None:
    points = [day(1, 300.0), day(8, 420.0, failed=True, label="drill 2")]
    root = parse(time_chart("Drills", [Series("recovery", points)], unit=Unit.SECONDS,
                            start=START, end=END))
    ok, failed = markers(root)
    assert ok.tag.endswith("circle") and "failed" not in ok.get("class", "")
    assert failed.tag.endswith("path") and "failed" in failed.get("class", "").split()
    tip = failed.findtext("svg:title", namespaces=NS) or ""
    assert "failed" in tip and "drill 2" in tip and "7 min" in tip
    assert "1 failed" in (root.findtext("svg:desc", namespaces=NS) or "")


def test_text_is_escaped() -> None:
    evil = '<script>alert("x")</script> & co'
    svg = time_chart(evil, [Series(evil, [day(1, 1.0, label=evil)])], unit=Unit.COUNT,
                     start=START, end=END)
    assert "<script" not in svg
    root = parse(svg)
    assert root.findtext("svg:title", namespaces=NS) == evil
    group = root.find("svg:g", NS)
    assert group is not None and group.get("data-series") == evil


def test_an_empty_period_says_so() -> None:
    root = parse(time_chart("Gaps", [Series("gaps", [day(-5, 10.0)])], unit=Unit.SECONDS,
                            start=START, end=END))
    assert markers(root) == []
    assert any(e.text == "No data in this period" for e in root.iter())
    assert "gaps: no data." in (root.findtext("svg:desc", namespaces=NS) or "")


def test_a_chart_speaks_the_pages_language() -> None:
    words = Words(no_data="Sem dados neste período", failed="falhou")
    empty = time_chart("Gaps", [], unit=Unit.SECONDS, start=START, end=END, words=words)
    assert "Sem dados neste período" in empty and "No data" not in empty
    root = parse(time_chart("Drills", [Series("teste", [day(1, 3.0, failed=True)])],
                            unit=Unit.SECONDS, start=START, end=END, words=words))
    tip = markers(root)[0].findtext("svg:title", namespaces=NS) or ""
    assert tip.endswith(", falhou")


def test_two_series_are_told_apart_by_class_and_name() -> None:
    root = parse(time_chart("Size", [Series("database", [day(1, 5.0)]),
                                     Series("uploads", [day(1, 7.0), day(2, 8.0)])],
                            unit=Unit.BYTES, start=START, end=END, chart_id="size"))
    groups = [g for g in root.findall("svg:g", NS) if g.get("data-series")]
    assert [g.get("data-series") for g in groups] == ["database", "uploads"]
    assert [g.get("class") for g in groups] == ["series series-0", "series series-1"]
    legend = [g for g in root.findall("svg:g", NS) if "legend" in g.get("class", "")]
    assert [g.findtext("svg:text", namespaces=NS) for g in legend] == ["database", "uploads"]
    assert [g.get("class") for g in legend] == ["legend series-0", "legend series-1"]
    assert root.get("aria-labelledby") == "size-title size-desc"


def test_a_period_must_move_forward() -> None:
    with pytest.raises(ValueError, match="after its start"):
        time_chart("x", [], unit=Unit.COUNT, start=END, end=END)


@pytest.mark.parametrize(("value", "unit", "text"), [
    (512, Unit.BYTES, "512 B"), (1_500_000_000, Unit.BYTES, "1.5 GB"),
    (42.0, Unit.SECONDS, "42 s"), (252, Unit.SECONDS, "4 min 12 s"),
    (3600, Unit.SECONDS, "1 h"), (5400, Unit.SECONDS, "1 h 30 min"),
    (3 * 86400, Unit.SECONDS, "3 days"), (12, Unit.COUNT, "12"),
])
def test_values_read_as_people_say_them(value: float, unit: Unit, text: str) -> None:
    assert fmt(value, unit) == text
