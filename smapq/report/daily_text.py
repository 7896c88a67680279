"""The daily report as plain text, to mail to postmaster from cron (pflogsumm's place).

Purpose: headed sections, each an 80-column table from ``output.write_table``; an empty
section says ``none``. Notes that the table writer would send to stderr (``more rows
than shown``) are printed inside the section, since cron mails stdout only.
"""

from __future__ import annotations

import io
from typing import TextIO

from smapq.report import daily
from smapq.report.output import TABLE_WIDTH, write_table
from smapq.report.timespec import short_time


def _heading(out: TextIO, title: str) -> None:
    out.write(f"\n{title}\n{'-' * len(title)}\n")


def write(d: daily.Daily, out: TextIO, width: int = TABLE_WIDTH) -> None:
    out.write(
        f"smapq daily report for {d.host}\n"
        f"{short_time(d.since)} to {short_time(d.until)} UTC "
        f"(generated {short_time(d.now)})\n"
    )
    _heading(out, "Grand totals")
    for label, value in daily.totals_lines(d):
        out.write(f"  {label + ':':14} {value}\n")
    for title, report in daily.sections(d):
        _heading(out, title)
        if not report.rows:
            out.write("  none\n")
            continue
        buf = io.StringIO()
        write_table(report, buf, width)
        out.write(buf.getvalue())
        if report.more:
            out.write(f"  (top {d.top} shown; raise --top for more)\n")
    _heading(out, "Queue age now (waiting recipients, minutes)")
    pairs = list(daily.age_pairs(d))
    if not any(n for _, n in pairs):
        out.write("  none waiting\n")
    else:
        out.write("  " + " ".join(f"{label:>6}" for label, _ in pairs) + "\n")
        out.write("  " + " ".join(f"{n:>6}" for _, n in pairs) + "\n")
