"""The server-drawn charts in a real browser (issue 16): they render at desktop and phone
widths with the page's style, every point where the chart says, nothing fetched from
outside, no console error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conexa_backup.charts import STYLE, Point, Series, Unit, responsive_chart
from tests.browser import DESKTOP, PHONE, open_page, screenshot

END = datetime(2026, 12, 6, tzinfo=UTC)
START = END - timedelta(days=30)


def page_html() -> str:
    sizes = [Series("database", [Point(START + timedelta(days=d), 1.2e9 + d * 1e7)
                                 for d in range(30)]),
             Series("uploads", [Point(START + timedelta(days=d), 2e8 + d * 3e6)
                                for d in range(30)])]
    drills = [Series("recovery", [Point(START + timedelta(days=d), 250.0 + d,
                                        failed=d == 16) for d in (2, 9, 16, 23)])]
    charts = [
        responsive_chart("Backup size", sizes, unit=Unit.BYTES, start=START, end=END,
                         chart_id="a"),
        responsive_chart("Drill recovery time", drills, unit=Unit.SECONDS, start=START, end=END,
                         objective=3600, objective_label="RTO 1 h", chart_id="b"),
        responsive_chart("Gaps between backups", [Series("gap", [])], unit=Unit.SECONDS,
                         start=START, end=END, objective=86400, objective_label="RPO 1 day",
                         chart_id="c"),
    ]
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width'>"
            f"<style>body {{ font-family: sans-serif; margin: 8px; }}{STYLE}</style></head>"
            "<body>" + "".join(f"<figure>{c}</figure>" for c in charts) + "</body></html>")


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_charts_render_in_a_real_browser(size: tuple[int, int]) -> None:
    with open_page(size) as (page, seen):
        page.set_content(page_html())
        charts = page.locator("svg.chart:visible")  # one drawing of each: the screen's
        assert charts.count() == 3
        narrow = size == PHONE
        for i in range(3):
            assert (charts.nth(i).get_attribute("id") or "").endswith("-narrow") == narrow
            box = charts.nth(i).bounding_box()
            assert box is not None and 0 < box["width"] <= size[0] and box["height"] > 0
        # Text stays readable: the axis labels are drawn at least 9 px tall on either screen.
        heights = page.evaluate("""() => [...document.querySelectorAll('svg.chart text.axis')]
            .map(t => t.getBoundingClientRect().height).filter(h => h > 0)""")
        assert heights and min(heights) >= 9, heights
        # Every marker is drawn inside its chart, and styled (the page's CSS applies).
        drawn = page.evaluate("""() => [...document.querySelectorAll('svg.chart')]
            .filter(svg => svg.getBoundingClientRect().width > 0).map(svg => {
            const box = svg.getBoundingClientRect();
            return [...svg.querySelectorAll('.point')].map(p => {
                const r = p.getBoundingClientRect();
                return {inside: r.width > 0 && r.left >= box.left && r.right <= box.right
                                && r.top >= box.top && r.bottom <= box.bottom,
                        fill: getComputedStyle(p).fill, stroke: getComputedStyle(p).stroke,
                        failed: p.classList.contains('failed')};
            });
        })""")
        assert [len(points) for points in drawn] == [60, 4, 0]
        assert all(p["inside"] for points in drawn for p in points)
        colours = {p["fill"] for p in drawn[0]}
        assert colours == {"rgb(31, 95, 168)", "rgb(217, 138, 0)"}  # two series, two colours
        failed = [p for p in drawn[1] if p["failed"]]
        assert len(failed) == 1 and failed[0]["stroke"] == "rgb(176, 0, 32)"
        name = "desktop" if size == DESKTOP else "phone"
        assert screenshot(page, f"charts-{name}").stat().st_size > 0
        assert seen.errors == [] and seen.remote == []
