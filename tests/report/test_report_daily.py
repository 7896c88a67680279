"""``smapq report daily``: the text for cron mail, and the HTML page, rendered by Chromium.

The HTML test is the operator's look at the page: headless Chromium (Debian's
``chromium``; .ci/run installs it) renders the file with the network off and takes a
screenshot; the test decodes the PNG and counts each chart colour. A series with data
covers more than its 12 x 12 legend swatch; a series without data covers exactly the
swatch, so a chart that did not render, or drew the wrong series, fails.
"""

from __future__ import annotations

import html.parser
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import text

from smapq.report.daily_html import COLOURS
from smapq.store import queries
from tests.conftest import Spool, make_spool
from tests.report.conftest import HOUR, Filled, add

SWATCH = 12 * 12


def add_day(filled: Filled) -> None:
    """Deferrals, folded refusals and a hostile sender on top of the common fixture."""
    now = filled.now
    with filled.engine.begin() as conn:
        add(
            conn,
            "EVIL",
            received_at=now - 3 * HOUR,
            sender="<script>alert(1)</script>@x.example",
            rcpts=["victim@b.example"],
            size=50,
        )
        queries.insert_events(
            conn,
            [
                {"at": now - 2 * HOUR, "kind": "deferred", "queue_id": "M3", "code": 75,
                 "detail": "451 4.3.0 try again later; next try in 300s"},
                {"at": now - HOUR, "kind": "deferred", "queue_id": "M3", "code": 75,
                 "detail": "451 4.3.0 try again later; next try in 600s"},
                {"at": now - 90, "kind": "reject", "client_addr": "203.0.113.5", "code": 500,
                 "detail": "command unrecognized: FOO"},
                {"at": now - 80, "kind": "reject", "client_addr": "203.0.113.5", "code": 500,
                 "detail": "command unrecognized: BAR"},
            ],
        )  # fmt: skip


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(title) + 2
    end = next((i for i in range(start, len(lines)) if lines[i] == ""), len(lines))
    return lines[start:end]


def test_daily_text_has_every_section(filled: Filled) -> None:
    add_day(filled)
    out = filled.smapq("report", "daily").stdout
    assert out.startswith("smapq daily report for ")
    totals = dict(line.strip().split(":", 1) for line in section(out, "Grand totals"))
    assert totals["connections"].split()[0] == "10"  # 6 + EVIL's + 3 abusive
    assert totals["received"].split()[0] == "7"
    assert totals["delivered"].split()[0] == "1" and totals["bad"].split()[0] == "1"
    assert totals["deferred"].split()[0] == "2" and totals["refused"].split()[0] == "4"
    assert totals["waiting now"].strip().startswith("6 messages (1 deferred, 1 held)")
    traffic = section(out, "Traffic per hour (UTC)")
    assert traffic[0].split() == ["HOUR", "CONN", "RCVD", "DELIV", "DEFERRED", "BAD", "REFUSED"]
    assert sum(int(line.split()[3]) for line in traffic[1:]) == 7
    refusals = section(out, "Refusals by reason")
    assert refusals[1].split()[:4] == ["2", "554", "RCPT", "TO:<alice@a.example>:"]
    assert "2   500  command unrecognized" in refusals[2]  # FOO and BAR folded into one
    deferrals = section(out, "Deferral reasons")
    assert deferrals[1].split()[:2] == ["2", "75"] and "next try" not in deferrals[1]
    bad = section(out, "Mail that went bad")
    assert bad[1].split()[2:4] == ["M4", "<>"]
    assert "bob@b.example" in "\n".join(section(out, "Top recipients"))
    assert section(out, "Queue age now (waiting recipients, minutes)")[0].split()[0] == "5m"
    assert all(len(line) <= 80 for line in out.splitlines())


def test_daily_day_option(filled: Filled) -> None:
    out = filled.smapq("report", "daily", "--day", "2026-11-25").stdout
    assert "2026-11-25 00:00 to 2026-11-26 00:00 UTC" in out
    assert section(out, "Mail that went bad") == ["  none"]
    for args, fragment in (
        (["--day", "someday"], "--day: 'someday' is not today, yesterday or a date"),
        (["--day", "today", "--since", "1h"], "--day excludes --since and --until"),
    ):
        bad = filled.smapq("report", "daily", *args, check=False)
        assert bad.returncode == 64 and fragment in bad.stderr
        assert len(bad.stderr.splitlines()) == 1


class _Page(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: Counter[str] = Counter()
        self.refs: list[str] = []
        self.csp = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href", "action", "xlink:href") or name.startswith("on"):
                self.refs.append(f"{tag} {name}={value}")
            if name == "style" and value and "url(" in value:
                self.refs.append(f"{tag} style")
        if tag == "meta" and dict(attrs).get("http-equiv") == "Content-Security-Policy":
            self.csp = dict(attrs).get("content") or ""


def write_page(filled: Filled, path: Path) -> str:
    proc = filled.smapq("report", "daily", "--html", str(path))
    assert proc.stdout == "" and proc.stderr == ""
    return path.read_text()


def test_daily_html_is_self_contained_and_escaped(filled: Filled, tmp_path: Path) -> None:
    add_day(filled)
    page = write_page(filled, tmp_path / "daily.html")
    parsed = _Page()
    parsed.feed(page)
    assert parsed.tags["svg"] == 3 and parsed.tags["script"] == 0 and parsed.tags["link"] == 0
    assert parsed.refs == []
    assert "default-src 'none'" in parsed.csp
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "url(" not in page and "@import" not in page
    bad = filled.smapq("report", "daily", "--html", str(tmp_path / "no" / "x.html"), check=False)
    assert bad.returncode == 1 and bad.stderr.startswith(f"smapq: {tmp_path / 'no' / 'x.html'}")


# --- the look: Chromium renders it --------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB/RGBA, non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", head)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        line = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        ftype, cur = line[0], bytearray(line[1:])
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                cur[i] = (cur[i] + a) & 255
            elif ftype == 2:
                cur[i] = (cur[i] + b) & 255
            elif ftype == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) & 255
        rows.append(
            bytes(cur if bpp == 3 else b"".join(cur[i : i + 3] for i in range(0, stride, 4)))
        )
        prev = cur
    return width, height, rows


def colour_counts(png: Path) -> Counter[str]:
    _, _, rows = png_pixels(png.read_bytes())
    wanted = {bytes.fromhex(v[1:]): k for k, v in COLOURS.items()}
    counts: Counter[str] = Counter()
    for row in rows:
        for i in range(0, len(row), 3):
            name = wanted.get(row[i : i + 3])
            if name:
                counts[name] += 1
    return counts


def screenshot(page: Path) -> Path:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed to look at the page (.ci/run installs it)"
    shot = page.with_suffix(".png")
    with tempfile.TemporaryDirectory(prefix="smapq-chromium-") as profile:
        proc = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--force-device-scale-factor=1",
                "--hide-scrollbars",
                "--window-size=900,1300",
                f"--screenshot={shot}",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert proc.returncode == 0 and shot.exists(), proc.stderr
    return shot


def shot_of(source: Filled | Spool, where: Path) -> Path:
    where.mkdir(exist_ok=True)
    page = where / "daily.html"
    proc = source.smapq("report", "daily", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    return screenshot(page)


@pytest.mark.integration
def test_chromium_draws_every_chart(filled: Filled, tmp_path: Path) -> None:
    add_day(filled)
    with filled.engine.begin() as conn:
        # A second delivery in the same hour, so p50, p90 and max are drawn apart.
        conn.execute(
            text(
                "UPDATE messages SET state = 'delivered', delivered_at = :d WHERE queue_id = 'M8'"
            ),
            {"d": filled.now - 5},
        )
    counts = colour_counts(shot_of(filled, tmp_path / "day"))
    for series in ("received", "delivered", "deferred", "bad", "refused", "waiting"):
        assert counts[series] > SWATCH, (series, counts)
    for series in ("p50", "p90", "max"):
        assert counts[series] > SWATCH, (series, counts)
    # The same page for an empty queue: only the legend swatches are drawn.
    (tmp_path / "empty").mkdir()
    empty = colour_counts(shot_of(make_spool(tmp_path / "empty"), tmp_path / "empty"))
    assert dict(empty) == dict.fromkeys(COLOURS, SWATCH)
