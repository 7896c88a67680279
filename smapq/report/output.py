"""Report output: aligned 80-column tables, CSV and the stable JSON document.

Purpose: every report and listing is a ``Report`` (named columns of typed raw values and
a row iterator) and leaves presentation to one of three writers. Rows are streamed: the
table writer buffers at most ``TABLE_SAMPLE`` rows to size its columns, the CSV and JSON
writers hold one row at a time, so memory stays flat on any listing.

The JSON document (format_version 1; see docs/reports.md) is:
``{"report", "format_version", "generated_at", "since", "until", "columns", "rows",
"more", "notes"}`` where ``rows`` is a list of objects keyed by column name, times are
ISO 8601 UTC strings (``...Z``), durations are seconds, sizes are bytes. Keys are only
ever added in later versions, never renamed or removed.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from itertools import islice
from typing import Any, TextIO

from smapq.errors import UsageError
from smapq.report.timespec import human_bytes, human_duration, iso, long_time, short_time

FORMATS = ("table", "csv", "json")
FORMAT_VERSION = 1
TABLE_WIDTH = 80
TABLE_SAMPLE = 200
GAP = "  "
ELLIPSIS = "…"

# "epoch": a raw value that is a time (report sql's ``*_at`` columns): programs get it
# as stored, tables show it as a UTC time.
# "list": a list of strings (a JSON array; space-separated in CSV).
KINDS = ("text", "int", "time", "duration", "bytes", "float", "raw", "epoch", "list")
BLOB_PREVIEW = 60
_NUMERIC = frozenset({"int", "duration", "bytes", "float"})


class Column:
    """One column: JSON/CSV name, table title, value kind, and whether it may shrink."""

    __slots__ = ("data", "flex", "kind", "name", "table", "title")

    def __init__(
        self,
        name: str,
        kind: str = "text",
        title: str = "",
        flex: bool = False,
        table: bool = True,
        data: bool = True,
    ) -> None:
        assert kind in KINDS, kind
        self.name = name
        self.kind = kind
        self.title = title or name.upper()
        self.flex = flex
        # table=False: only in CSV/JSON (raw times); data=False: only for people.
        self.table = table
        self.data = data


class Report:
    """A named result: columns, streamed rows, the window it covers, notes for people."""

    def __init__(
        self,
        name: str,
        columns: Sequence[Column],
        rows: Iterable[Sequence[Any]],
        *,
        since: float | None = None,
        until: float | None = None,
        generated_at: float = 0.0,
    ) -> None:
        self.name = name
        self.columns = list(columns)
        self.rows = rows
        self.since = since
        self.until = until
        self.generated_at = generated_at
        self.more = False
        self.notes: list[str] = []
        # Further top-level JSON keys (e.g. the paging cursor of queue list).
        self.extra: dict[str, Any] = {}

    def limit(self, rows: Iterable[Sequence[Any]], n: int | None) -> Iterator[Sequence[Any]]:
        """Yield at most n rows (None: all); set ``more`` if a further row exists."""
        if n is None:
            yield from rows
            return
        it = iter(rows)
        yield from islice(it, n)
        if next(it, None) is not None:
            self.more = True


def write(report: Report, fmt: str, out: TextIO, err: TextIO, width: int = TABLE_WIDTH) -> None:
    """Write ``report`` to ``out`` in ``fmt``; table and CSV notes go to ``err``."""
    writer: dict[str, Callable[[], None]] = {
        "table": lambda: write_table(report, out, width),
        "csv": lambda: write_csv(report, out),
        "json": lambda: write_json(report, out),
    }
    if fmt not in writer:
        raise UsageError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    writer[fmt]()
    if fmt != "json":
        for note in report.notes:
            err.write(f"note: {note}\n")
        if report.more:
            err.write("note: more rows than shown; raise --top/--limit or page on\n")


# --- JSON and CSV: raw values -----------------------------------------------------


def _number(value: Decimal) -> int | float:
    """PostgreSQL's numeric (sums, an operator's literal in report sql) as SQLite gives
    the same value: an integer when it is one that fits 64 bits, else a float."""
    if value == value.to_integral_value() and abs(value) < 2**63:
        return int(value)
    return float(value)


def _plain(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Decimal):
        value = _number(value)
    if kind == "time":
        return iso(float(value))
    if kind in ("duration", "float"):
        return round(float(value), 3)
    if kind in ("int", "bytes"):
        return int(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if kind in ("raw", "epoch") and isinstance(value, int | float):
        return value
    if kind == "list":
        return [str(v) for v in value]
    return str(value)


def _picked(columns: Sequence[Column], want: str) -> list[int]:
    return [i for i, c in enumerate(columns) if getattr(c, want)]


def json_row(columns: Sequence[Column], row: Sequence[Any]) -> dict[str, Any]:
    return {c.name: _plain(c.kind, v) for c, v in zip(columns, row, strict=True) if c.data}


def write_json(report: Report, out: TextIO) -> None:
    head = {
        "report": report.name,
        "format_version": FORMAT_VERSION,
        "generated_at": iso(report.generated_at),
        "since": iso(report.since),
        "until": iso(report.until),
        "columns": [{"name": c.name, "kind": c.kind} for c in report.columns if c.data],
    }
    out.write(json.dumps(head)[:-1] + ', "rows": [')
    sep = "\n"
    for row in report.rows:
        out.write(sep + json.dumps(json_row(report.columns, row)))
        sep = ",\n"
    tail = {"more": report.more, "notes": report.notes, **report.extra}
    out.write("\n], " + json.dumps(tail)[1:] + "\n")


def write_csv(report: Report, out: TextIO) -> None:
    keep = _picked(report.columns, "data")
    cols = [report.columns[i] for i in keep]
    w = csv.writer(out, lineterminator="\n")
    w.writerow([c.name for c in cols])
    for row in report.rows:
        w.writerow([_csv_cell(c.kind, row[i]) for i, c in zip(keep, cols, strict=True)])


def _csv_cell(kind: str, value: Any) -> Any:
    if value is None:
        return ""
    if kind == "list":
        return " ".join(str(v) for v in value)
    return _plain(kind, value)


# --- tables: for people -------------------------------------------------------------


def cell(kind: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        value = _number(value)
    if kind == "time":
        return short_time(float(value))
    if kind == "duration":
        return human_duration(float(value))
    if kind == "bytes":
        return human_bytes(int(value))
    if kind == "float":
        return f"{float(value):.3f}"
    if kind == "list":
        value = ", ".join(str(v) for v in value)
    elif kind == "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
        return long_time(float(value))
    if isinstance(value, bytes):
        return blob_cell(value)
    # One line per row: control characters from the network never reach the terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in str(value))


def blob_cell(value: bytes) -> str:
    """``<812 bytes> Subject: hi↵From: …``: the size, then the start as one line of text."""
    head = value[: BLOB_PREVIEW * 4].decode("utf-8", "replace")
    head = head.replace("\r\n", "\n").replace("\n", "↵")[:BLOB_PREVIEW]
    text = "".join(ch if ch.isprintable() else "?" for ch in head)
    return f"<{len(value)} bytes> {text}".rstrip()


def _char_width(ch: str) -> int:
    """Terminal columns of one printable character: 2 for East Asian wide, 0 for marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal (``len`` counts code points, not columns)."""
    if text.isascii():
        return len(text)
    return sum(_char_width(ch) for ch in text)


def fit(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, with '…' where it was cut."""
    if display_width(text) <= width:
        return text
    room = width - 1 if width > 1 else width
    kept: list[str] = []
    used = 0
    for ch in text:
        used += _char_width(ch)
        if used > room:
            break
        kept.append(ch)
    cut = "".join(kept)
    return cut if width <= 1 else cut + ELLIPSIS


def pad(text: str, width: int, right: bool = False) -> str:
    """``text`` padded with spaces to ``width`` columns (on the left if ``right``)."""
    fill = " " * max(0, width - display_width(text))
    return fill + text if right else text + fill


def widths(columns: Sequence[Column], sample: Sequence[Sequence[str]], total: int) -> list[int]:
    """Natural widths; flexible columns shrink so a line fits ``total`` (0: no limit)."""
    natural = [display_width(c.title) for c in columns]
    for cells in sample:
        natural = [max(w, display_width(s)) for w, s in zip(natural, cells, strict=True)]
    if total <= 0:
        return natural
    room = total - len(GAP) * (len(columns) - 1)
    fixed = sum(w for w, c in zip(natural, columns, strict=True) if not c.flex)
    flex = [i for i, c in enumerate(columns) if c.flex]
    spare = room - fixed
    out = list(natural)
    # Give narrow flexible columns what they need first, then share the rest evenly.
    for n, i in enumerate(sorted(flex, key=lambda i: natural[i])):
        share = max(spare // (len(flex) - n), 6, len(columns[i].title))
        out[i] = min(natural[i], share)
        spare -= out[i]
    return out


def write_table(report: Report, out: TextIO, width: int = TABLE_WIDTH) -> None:
    keep = _picked(report.columns, "table")
    cols = [report.columns[i] for i in keep]

    def cells(row: Sequence[Any]) -> list[str]:
        return [cell(c.kind, row[i]) for i, c in zip(keep, cols, strict=True)]

    it = iter(report.rows)
    sample = [cells(row) for row in islice(it, TABLE_SAMPLE)]
    ws = widths(cols, sample, width)

    def line(texts: Sequence[str]) -> str:
        parts = []
        for c, w, text in zip(cols, ws, texts, strict=True):
            s = fit(text, w)
            parts.append(pad(s, w, right=c.kind in _NUMERIC))
        return GAP.join(parts).rstrip() + "\n"

    out.write(line([c.title for c in cols]))
    for texts in sample:
        out.write(line(texts))
    for row in it:
        out.write(line(cells(row)))
    if not sample:
        report.notes.append("no rows")
