"""Charts as inline SVG, drawn on the server (issue 16): the status page and the HTML report.

One kind of chart: values over time (backup sizes, durations, drill recovery times, gaps
between backups), one or more series, and optionally an objective drawn as a dashed line
(the RTO, the RPO). The output is a self-contained ``<svg>`` element: no script, no external
request, readable with JavaScript off; each point carries a ``<title>`` (the browser's
tooltip, and what a screen reader says), and the chart a ``<title>`` and a ``<desc>``
summing it up in words.

Colours come from CSS classes (``series-0``..., ``objective``, ``failed``) that the page
styles, and never carry meaning alone: each series is named in a legend, a failed point is
a cross, not a dot, and its tooltip says "failed"; the objective line is labelled in text.

Example::

    svg = time_chart("Backup size", [Series("database", points)], unit=Unit.BYTES,
                     start=now - timedelta(days=30), end=now)
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Final

# The charts' look, for a page's <style> (the status page, the HTML report). Blue and orange:
# told apart with the common colour blindnesses, and never the only difference (see above).
STYLE: Final = """
svg.chart { width: 100%; max-width: 640px; height: auto; display: block; font-family: inherit; }
svg.chart .grid { stroke: #ddd; }
svg.chart .axis, svg.chart .objective-label, svg.chart .empty { font-size: 12px; fill: #555; }
svg.chart .legend text { font-size: 13px; fill: #222; }
svg.chart .objective { stroke: #b00020; stroke-width: 1.5; }
svg.chart .objective-label { fill: #b00020; }
svg.chart .line { stroke-width: 2; fill: none; }
svg.chart .series-0 .line { stroke: #1f5fa8; }
svg.chart .series-0 .point, svg.chart .series-0 .swatch { fill: #1f5fa8; }
svg.chart .series-1 .line { stroke: #d98a00; }
svg.chart .series-1 .point, svg.chart .series-1 .swatch { fill: #d98a00; }
svg.chart .point.failed { stroke: #b00020; stroke-width: 2.5; fill: none; }
.chart-narrow { display: none; }
@media (max-width: 600px) { .chart-wide { display: none; } .chart-narrow { display: block; } }
"""
NARROW: Final = 360  # a phone's width: the narrow drawing's, so its text keeps its size
WIDTH: Final = 640
HEIGHT: Final = 220
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 64, 16, 32, 28  # the legend in the top pad
_TICKS: Final = 4  # horizontal grid lines, about


class Unit(enum.Enum):
    """What a chart's values are, for its axis labels and tooltips."""

    BYTES = "bytes"
    SECONDS = "seconds"
    COUNT = "count"


@dataclass(frozen=True)
class Point:
    """One value at one time; ``failed`` points are drawn as crosses (a failed drill)."""

    at: datetime
    value: float
    label: str = ""  # what the tooltip says besides the time and value (a backup id...)
    failed: bool = False


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]


@dataclass(frozen=True)
class Words:
    """What a chart (and :func:`fmt`) says in words, for a page in another language."""

    no_data: str = "No data in this period"
    failed: str = "failed"
    days: str = "days"
    months: tuple[str, ...] = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                               "Oct", "Nov", "Dec")
    points: str = "{name}: {count} points, from {low} to {high}"
    failed_count: str = ", {count} failed"
    nothing: str = "{name}: no data."
    objective: str = "Objective: {what}."


ENGLISH: Final = Words()


def fmt(value: float, unit: Unit, words: Words = ENGLISH) -> str:
    """``value`` as a person reads it: ``1.5 GB``, ``4 min 12 s``, ``12``, ``4.2 days`` (the
    word for days from ``words``)."""
    if unit is Unit.BYTES:
        for name, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g} {name}"
        return f"{value:.0f} B"
    if unit is Unit.SECONDS:
        seconds = round(value)
        if seconds < 60:
            return f"{value:.3g} s"
        if seconds < 3600:
            minutes, rest = divmod(seconds, 60)
            return f"{minutes} min {rest} s" if rest else f"{minutes} min"
        if seconds < 2 * 86400:
            hours, rest = divmod(seconds, 3600)
            return f"{hours} h {rest // 60} min" if rest >= 60 else f"{hours} h"
        return f"{value / 86400:.3g} {words.days}"
    return f"{value:.4g}"


def _nice_step(span: float, unit: Unit) -> float:
    """A round step that cuts ``span`` into about :data:`_TICKS` parts (1, 2 or 5 times a
    power of ten; for times, a round number of seconds, minutes, hours or days)."""
    raw = span / _TICKS
    if unit is Unit.SECONDS:
        for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600,
                     43200, 86400):
            if step >= raw:
                return float(step)
        return 86400.0 * math.ceil(raw / 86400)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)


def _y_ticks(top: float, unit: Unit) -> list[float]:
    step = _nice_step(top, unit)
    return [step * i for i in range(math.ceil(top / step) + 1)]


def time_chart(title: str, series: Sequence[Series], *, unit: Unit, start: datetime,
               end: datetime, objective: float | None = None, objective_label: str = "",
               chart_id: str = "chart", width: int = WIDTH, height: int = HEIGHT,
               words: Words = Words()) -> str:
    """An SVG chart of ``series`` between ``start`` and ``end`` (points outside are left
    out), its y axis from 0 to past the largest value and the ``objective`` (drawn dashed,
    with ``objective_label``). ``chart_id`` makes its element ids unique on a page.

    Raises:
        ValueError: ``end`` is not after ``start``.
    """
    if end <= start:
        raise ValueError("a chart's end must come after its start")
    shown = [Series(s.name, [p for p in s.points if start <= p.at <= end]) for s in series]
    values = [p.value for s in shown for p in s.points]
    top = max([*values, objective or 0.0, 0.0])
    ticks = _y_ticks(top if top > 0 else 1.0, unit)
    y_max = ticks[-1]
    plot_w = width - _PAD_LEFT - _PAD_RIGHT
    plot_h = height - _PAD_TOP - _PAD_BOTTOM
    span = (end - start).total_seconds()

    def x(at: datetime) -> float:
        return _PAD_LEFT + plot_w * (at - start).total_seconds() / span

    def y(value: float) -> float:
        return _PAD_TOP + plot_h * (1 - value / y_max)

    said = _describe(shown, unit, objective, objective_label, words)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{chart_id}" class="chart" role="img" '
        f'viewBox="0 0 {width} {height}" aria-labelledby="{chart_id}-title {chart_id}-desc">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(said)}</desc>',
    ]
    for tick in ticks:
        out.append(f'<line class="grid" x1="{_PAD_LEFT}" x2="{width - _PAD_RIGHT}" '
                   f'y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>')
        out.append(f'<text class="axis" x="{_PAD_LEFT - 6}" y="{y(tick) + 4:.1f}" '
                   f'text-anchor="end">{escape(fmt(tick, unit, words))}</text>')
    out += _x_labels(start, end, x, height, words)
    if objective is not None:
        out.append(f'<line class="objective" x1="{_PAD_LEFT}" x2="{width - _PAD_RIGHT}" '
                   f'y1="{y(objective):.1f}" y2="{y(objective):.1f}" stroke-dasharray="6 4"/>')
        out.append(f'<text class="objective-label" x="{width - _PAD_RIGHT}" '
                   f'y="{y(objective) - 4:.1f}" text-anchor="end">'
                   f"{escape(objective_label or fmt(objective, unit, words))}</text>")
    for index, s in enumerate(shown):
        out += _series(s, index, unit, x, y, words)
    out += _legend(shown)
    if not values:
        out.append(f'<text class="empty" x="{_PAD_LEFT + plot_w / 2:.1f}" '
                   f'y="{_PAD_TOP + plot_h / 2:.1f}" text-anchor="middle">'
                   f"{escape(words.no_data)}</text>")
    out.append("</svg>")
    return "\n".join(out)


XScale = Callable[[datetime], float]
YScale = Callable[[float], float]


def responsive_chart(title: str, series: Sequence[Series], *, unit: Unit, start: datetime,
                     end: datetime, objective: float | None = None, objective_label: str = "",
                     chart_id: str = "chart", words: Words = Words()) -> str:
    """:func:`time_chart` drawn twice, wide and phone-narrow, the page's :data:`STYLE`
    showing one by the screen's width (no script): scaled down to a phone, a wide drawing's
    text would be too small to read."""
    wide, narrow = (time_chart(title, series, unit=unit, start=start, end=end,
                               objective=objective, objective_label=objective_label,
                               chart_id=chart_id + suffix, width=width, words=words)
                    for suffix, width in (("", WIDTH), ("-narrow", NARROW)))
    return f'<div class="chart-wide">{wide}</div><div class="chart-narrow">{narrow}</div>'


def _series(s: Series, index: int, unit: Unit, x: XScale, y: YScale, words: Words
            ) -> list[str]:
    """A series' line (points in time order) and its markers, each with its tooltip."""
    points = sorted(s.points, key=lambda p: p.at)
    out = [f'<g class="series series-{index}" data-series="{escape(s.name)}">']
    if len(points) > 1:
        path = " ".join(f"{x(p.at):.1f},{y(p.value):.1f}" for p in points)
        out.append(f'<polyline class="line" fill="none" points="{path}"/>')
    for p in points:
        px, py = x(p.at), y(p.value)
        said = ", ".join(w for w in (s.name, f"{p.at:%Y-%m-%d %H:%M} UTC",
                                     fmt(p.value, unit, words),
                                     p.label, words.failed if p.failed else "") if w)
        tip = f"<title>{escape(said)}</title>"
        if p.failed:  # a cross, not a dot: failure is told by shape and text, not colour
            out.append(f'<path class="point failed" d="M{px - 5:.1f},{py - 5:.1f} l10,10 '
                       f'm0,-10 l-10,10">{tip}</path>')
        else:
            out.append(f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" r="3.5">{tip}'
                       "</circle>")
    out.append("</g>")
    return out


def _legend(series: Sequence[Series]) -> list[str]:
    """Each series' name beside a sample of its line, along the top."""
    out, left = [], _PAD_LEFT
    for index, s in enumerate(series):
        out.append(f'<g class="legend series-{index}">'
                   f'<line class="line" x1="{left}" x2="{left + 16}" y1="12" y2="12"/>'
                   f'<circle class="swatch" cx="{left + 8}" cy="12" r="3.5"/>'
                   f'<text x="{left + 22}" y="16">{escape(s.name)}</text></g>')
        left += 22 + 8 * len(s.name) + 24
    return out


def _x_labels(start: datetime, end: datetime, x: XScale, height: int, words: Words
              ) -> list[str]:
    """Dates along the bottom: five, evenly spread."""
    step = (end - start) / 4
    out = []
    for i in range(5):
        at = start + step * i
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        label = f"{at:%d} {words.months[at.month - 1]}" if end - start > timedelta(days=2) \
            else f"{at:%H:%M}"
        out.append(f'<text class="axis" x="{x(at):.1f}" y="{height - 8}" '
                   f'text-anchor="{anchor}">{label}</text>')
    return out


def _describe(series: Sequence[Series], unit: Unit, objective: float | None,
              objective_label: str, words: Words) -> str:
    """The chart in one or two sentences, for a screen reader."""
    parts = []
    for s in series:
        if not s.points:
            parts.append(words.nothing.format(name=s.name))
            continue
        values = [p.value for p in s.points]
        failed = sum(1 for p in s.points if p.failed)
        parts.append(words.points.format(name=s.name, count=len(values),
                                         low=fmt(min(values), unit, words),
                                         high=fmt(max(values), unit, words))
                     + (words.failed_count.format(count=failed) if failed else "") + ".")
    if objective is not None:
        parts.append(words.objective.format(what=objective_label
                                            or fmt(objective, unit, words)))
    return " ".join(parts)
