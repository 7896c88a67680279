"""The daily report as one self-contained HTML page with inline SVG charts.

Purpose: the same sections as the text report, as tables, plus three charts: traffic
per hour, delivery latency and the age of the mail waiting now. One file, to put on
an intranet page or attach to the morning mail.

Security: the page contains no script and refers to nothing outside itself (no
fonts, stylesheets, images or links to fetch); its Content-Security-Policy
(``default-src 'none'``) tells the browser to refuse any script or fetch even if
one were injected. Every value that came from the network (addresses, client names,
reasons) is HTML-escaped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from html import escape
from typing import Any, TextIO

from smapq.report import daily, svg
from smapq.report.output import Report, cell
from smapq.report.timespec import human_duration, short_time

CSP = "default-src 'none'; style-src 'unsafe-inline'"
COLOURS = {
    "received": "#1f77b4",
    "delivered": "#2ca02c",
    "deferred": "#ff7f0e",
    "bad": "#d62728",
    "refused": "#9467bd",
    "p50": "#17becf",
    "p90": "#bcbd22",
    "max": "#e377c2",
    "waiting": "#8c564b",
}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.15em 0.7em; text-align: left; border-bottom: 1px solid #eee; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.sub { color: #666; }
svg { display: block; margin: 0.6em 0; }
"""
_NUMERIC = frozenset({"int", "bytes", "duration", "float"})


def _table(report: Report) -> str:
    cols = [c for c in report.columns if c.table]
    idx = [report.columns.index(c) for c in cols]
    head = "".join(f"<th>{escape(c.title)}</th>" for c in cols)
    body = []
    for row in report.rows:
        cells = []
        for c, i in zip(cols, idx, strict=True):
            cls = ' class="n"' if c.kind in _NUMERIC else ""
            cells.append(f"<td{cls}>{escape(cell(c.kind, row[i]))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return '<p class="sub">none</p>'
    more = '<p class="sub">more rows than shown</p>' if report.more else ""
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "</table>" + more


def _labels(d: daily.Daily, starts: Sequence[float]) -> list[str]:
    fmt = "%H:%M" if d.step == daily.HOUR else "%m-%d"
    return [dt.datetime.fromtimestamp(s, dt.UTC).strftime(fmt) for s in starts]


def charts(d: daily.Daily) -> list[str]:
    """The three SVG charts, in page order."""
    starts = [s for s, _ in d.traffic]
    labels = _labels(d, starts)
    names = ("received", "delivered", "deferred", "bad", "refused")
    traffic = svg.bar_chart(
        f"Traffic per {'hour' if d.step == daily.HOUR else 'day'} (UTC)",
        labels,
        [(n, COLOURS[n], [float(c[n]) for _, c in d.traffic]) for n in names],
    )
    by_start: dict[float, Any] = {float(r[0]): r for r in d.latency}
    lat: dict[str, list[float | None]] = {"p50": [], "p90": [], "max": []}
    for s in starts:
        r = by_start.get(s)
        for key, pos in (("p50", 2), ("p90", 3), ("max", 5)):
            lat[key].append(None if r is None else float(r[pos]))
    latency = svg.line_chart(
        "Delivery latency (receipt to delivery)",
        labels,
        [(k, COLOURS[k], v) for k, v in lat.items()],
        fmt=human_duration,
    )
    pairs = list(daily.age_pairs(d))
    age = svg.bar_chart(
        "Waiting recipients by age now (minutes)",
        [label for label, _ in pairs],
        [("waiting", COLOURS["waiting"], [float(n) for _, n in pairs])],
    )
    return [traffic, latency, age]


def write(d: daily.Daily, out: TextIO) -> None:
    title = f"smapq daily report for {d.host}"
    traffic, latency, age = charts(d)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{escape(short_time(d.since))} to {escape(short_time(d.until))} UTC'
        f" (generated {escape(short_time(d.now))})</p>",
        "<h2>Grand totals</h2><table>",
    ]
    for label, value in daily.totals_lines(d):
        parts.append(f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>")
    parts.append("</table>")
    parts += [traffic, latency, age]
    for heading, report in daily.sections(d):
        parts.append(f"<h2>{escape(heading)}</h2>")
        parts.append(_table(report))
    parts.append("</body></html>")
    out.write("\n".join(parts) + "\n")
