"""The report's bar charts as geometry: data in, bars / ticks / axis marks out (pixels).

The template draws a :class:`Chart` as inline SVG (macro ``chart`` in ``report.html.j2``); nothing
here writes markup. Equal-width histograms come from ``summary.json``'s ``histograms``; integer
value counts (subjects, people, segments, phrases per image) from its ``per_image``, one bar per
value up to :data:`MAX_BARS` bars, the rest summed into one overflow bar. Values that are not
numbers (an edited ``summary.json``) give a chart with a ``problem`` instead of bars.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from datagen.report.values import as_number

MAX_BARS = 50
WIDTH, HEIGHT = 560, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 24, 14, 40
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
NOT_NUMBERS = "summary.json holds values here that are not numbers"


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    cx: float  # centre, where the count is written
    label: str  # the bin or value, shown on hover with the count
    count: int | float
    show_count: bool  # count written above the bar


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Mark:
    """A y-axis mark: a count and its height."""

    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    xlabel: str
    log: bool = False
    bars: list[Bar] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    problem: str | None = None  # why there are no bars ("no values", ...)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_w: int = PLOT_W
    plot_h: int = PLOT_H


def _numbers(values) -> list[float | int] | None:
    if not isinstance(values, list):
        return None
    out = [as_number(v) for v in values]
    return None if any(v is None for v in out) else out


def histogram_chart(edges, counts, title: str, xlabel: str, log: bool = False) -> Chart:
    """Equal-width bins (``len(edges) == len(counts) + 1``) as bars, ticks at both ends and the middle."""
    if counts == [] or counts is None:
        return Chart(title, xlabel, log, problem="no values")
    edges_n, counts_n = _numbers(edges), _numbers(counts)
    if edges_n is None or counts_n is None or len(edges_n) != len(counts_n) + 1 or min(counts_n) < 0:
        return Chart(title, xlabel, log, problem=NOT_NUMBERS)
    n = len(counts_n)
    labels = [f"{edges_n[i]:.3f}–{edges_n[i + 1]:.3f}" for i in range(n)]
    ticks = {0: f"{edges_n[0]:.3f}", n // 2: f"{edges_n[n // 2]:.3f}", n: f"{edges_n[-1]:.3f}"}
    return _bars(labels, counts_n, title, xlabel, log, ticks, show_counts=False)


def value_counts_chart(value_counts, title: str, xlabel: str, log: bool = True) -> Chart:
    """Integer values 0..max as bars (one per value; beyond :data:`MAX_BARS` one overflow bar ``≥k``)."""
    if not value_counts:
        return Chart(title, xlabel, log, problem="no values")
    if not isinstance(value_counts, dict):
        return Chart(title, xlabel, log, problem=NOT_NUMBERS)
    items = []
    for k, v in value_counts.items():
        n = as_number(v)
        if not (isinstance(k, str) and re.fullmatch(r"[0-9]+", k)) or n is None or n < 0:
            return Chart(title, xlabel, log, problem=NOT_NUMBERS)
        items.append((int(k), n))
    items.sort()
    if len(items) > MAX_BARS:
        head, tail = items[: MAX_BARS - 1], items[MAX_BARS - 1 :]
        labelled = [(str(k), v) for k, v in head] + [(f"≥{tail[0][0]}", sum(v for _, v in tail))]
    else:
        labelled = [(str(k), v) for k, v in items]
    labels = [k for k, _ in labelled]
    step = max(1, math.ceil(len(labels) / 12))
    ticks = {i + 0.5: labels[i] for i in range(0, len(labels), step)}
    return _bars(labels, [v for _, v in labelled], title, xlabel, log, ticks, show_counts=True)


def _bars(labels, counts, title, xlabel, log, ticks, show_counts) -> Chart:
    peak = max(counts) or 1

    def scale(v: float) -> float:
        return math.log10(1 + v) / math.log10(1 + peak) if log else v / peak

    bw = PLOT_W / len(counts)
    base = TOP + PLOT_H
    if log:
        values = sorted({0, peak, *(10**k for k in range(0, 8) if 10**k < peak * 0.7)})
    else:
        values = [0, peak / 2, peak]
    marks = [Mark(round(base - scale(v) * PLOT_H, 1), _axis_number(v)) for v in values]
    bars = []
    for i, (label, c) in enumerate(zip(labels, counts, strict=True)):
        h = scale(c) * PLOT_H
        x = LEFT + i * bw
        bars.append(Bar(round(x + 0.5, 1), round(base - h, 1), round(max(bw - 1, 0.5), 1), round(h, 1),
                        round(x + bw / 2, 1), label, c, show_counts and bool(c) and bw >= 9))
    tick_list = [Tick(round(LEFT + pos * bw, 1), label) for pos, label in ticks.items()]
    return Chart(title, xlabel, log, bars, tick_list, marks)


def _axis_number(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.1f}"
