"""Small inline SVG charts for the HTML daily report: bars and lines, no scripts.

Purpose: a chart is one ``<svg>`` element as a string, sized in CSS pixels, with a
``<title>`` for screen readers, a y axis from 0 to a rounded maximum, x labels
thinned to fit, and a legend. Bars are drawn ``crispEdges`` so each series keeps its
exact colour (the rendering test looks for those colours in a screenshot).

Security: every text (titles, labels, series names) is escaped; numbers are
formatted by the caller's ``fmt``. Nothing refers to anything outside the element.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

WIDTH = 760
HEIGHT = 260
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 28, 46
Series = tuple[str, str, Sequence[float | None]]  # (name, colour, one value per category)


def nice_step(value: float, smallest: float = 0.0) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (and >= smallest)."""
    value = max(value, smallest)
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)  # pragma: no cover


def nice_max(value: float, whole: bool) -> float:
    """Top of a y axis with four gridlines at round values (whole numbers for counts)."""
    return 4 * nice_step(value / 4, 1.0 if whole else 0.0)


def _frame(title: str, top: float, fmt: Callable[[float], str]) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for i in range(5):
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" '
            f'stroke="#dddddd" stroke-width="1"/>'
        )
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{escape(fmt(top * i / 4))}</text>"
        )
    return out


def _x_labels(categories: Sequence[str], slot: float) -> list[str]:
    every = max(1, math.ceil(len(categories) * 44 / (WIDTH - LEFT - RIGHT)))
    out = []
    for i, label in enumerate(categories):
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            out.append(
                f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" font-size="11" '
                f'text-anchor="middle">{escape(label)}</text>'
            )
    return out


def _legend(series: Sequence[Series]) -> list[str]:
    out = []
    x = LEFT
    for name, colour, _ in series:
        out.append(
            f'<rect x="{x}" y="{HEIGHT - 16}" width="12" height="12" fill="{colour}" '
            'shape-rendering="crispEdges"/>'
        )
        out.append(f'<text x="{x + 16}" y="{HEIGHT - 6}" font-size="12">{escape(name)}</text>')
        x += 24 + 8 * len(name)
    return out


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    whole: bool = True,
) -> str:
    """Grouped bars: one group per category, one bar per series (counts by default)."""
    values = [v for _, _, vs in series for v in vs if v is not None]
    top = nice_max(max(values, default=0.0), whole)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(categories))
    bar = max(1.0, slot * 0.8 / max(1, len(series)))
    out = _frame(title, top, fmt)
    for i in range(len(categories)):
        for j, (name, colour, vs) in enumerate(series):
            v = vs[i]
            if not v:
                continue
            h = max(1.0, plot_h * v / top)
            x = LEFT + slot * i + slot * 0.1 + bar * j
            out.append(
                f'<rect x="{x:.0f}" y="{TOP + plot_h - h:.0f}" width="{max(1.0, bar):.0f}" '
                f'height="{h:.0f}" fill="{colour}" shape-rendering="crispEdges">'
                f"<title>{escape(categories[i])} {escape(name)}: {escape(fmt(v))}</title></rect>"
            )
    out += _x_labels(categories, slot)
    out += _legend(series)
    out.append("</svg>")
    return "\n".join(out)


def line_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    fmt: Callable[[float], str] = lambda v: f"{v:g}",
    whole: bool = False,
) -> str:
    """One line per series through the categories that have a value, with dot markers.

    Earlier series get larger dots, so equal values still show every colour as rings.
    """
    values = [v for _, _, vs in series for v in vs if v is not None]
    top = nice_max(max(values, default=0.0), whole)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(1, len(categories))
    out = _frame(title, top, fmt)
    for n, (name, colour, vs) in enumerate(series):
        radius = 4 + 2 * (len(series) - 1 - n)
        points = [
            (LEFT + slot * (i + 0.5), TOP + plot_h - plot_h * v / top)
            for i, v in enumerate(vs)
            if v is not None
        ]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for (x, y), v in zip(points, [v for v in vs if v is not None], strict=True):
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}">'
                f"<title>{escape(name)}: {escape(fmt(v))}</title></circle>"
            )
    out += _x_labels(categories, slot)
    out += _legend(series)
    out.append("</svg>")
    return "\n".join(out)
