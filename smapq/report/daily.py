"""``smapq report daily``: the day's mail in one report, like pflogsumm for smap/smapd.

Purpose: what a postmaster reads each morning -- grand totals, traffic per hour,
top senders, recipients and clients, refusals by reason, deferral reasons, the mail
that went bad, delivery latency and the age of what still waits. ``collect`` gathers
it once; ``daily_text`` renders it for mail from cron, ``daily_html`` as one page.

Clocks: everything counts events in the window [since, until) (default: the 24 hours
before now) from the append-only envelope log, so purged mail still counts; the
"now" lines (waiting, oldest, queue age) describe the queue at ``now``.

Reasons: details that differ only in a variable part are folded: the receiver's
``command unrecognized: XYZ`` and ``bad SIZE=…`` keep the text before the variable
part; the deliverer's ``…; next try in 300s`` loses its delay.

Security: read-only connection; every value from the network is escaped by the
renderers (text: control characters become ``?``; HTML: html.escape).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection

from smapq.report import reports
from smapq.report.output import Column, Report
from smapq.store import queries

HOUR = 3600
DAY = 86400
DEFAULT_TOP = 10
# Event kinds counted per period, and their names in the report.
TRAFFIC = (
    ("connect", "connections"),
    ("accept", "received"),
    ("delivered", "delivered"),
    ("deferred", "deferred"),
    ("bad", "bad"),
    ("reject", "refused"),
)
PROBES = ("vrfy", "expn", "timeout")
NOTICES = ("bounced", "warned")  # sender notices smapd queued (smapd: bounce)


class Daily:
    """Every section of the daily report, gathered from one read-only connection."""

    def __init__(self, since: float, until: float, now: float, host: str, top: int) -> None:
        self.since = since
        self.until = until
        self.now = now
        self.host = host
        self.top = top
        self.step = HOUR if until - since <= 2 * DAY else DAY
        self.totals: dict[str, int] = {}
        self.received_bytes = 0
        self.waiting = 0
        self.deferred_now = 0
        self.held = 0
        self.oldest_age: float | None = None
        # (period start, {traffic name: events}) for every period of the window.
        self.traffic: list[tuple[float, dict[str, int]]] = []
        self.sections: list[Report] = []
        self.latency: list[tuple[Any, ...]] = []
        self.age_labels: list[str] = []
        self.age_counts: list[int] = []
        self.tls: list[tuple[str, int]] = []  # (TLS version, sessions), most first

    def section(self, name: str) -> Report:
        return next(r for r in self.sections if r.name == name)


def fold_reason(kind: str, detail: str | None) -> str:
    """The reason of one refusal or deferral without its variable part."""
    text = (detail or "").strip() or "(no detail)"
    if kind == "deferred":
        text = text.split("; next try in ", 1)[0]
    elif text.startswith("command unrecognized: "):
        text = "command unrecognized"
    elif "=" in text and text.startswith("bad "):
        text = text.split("=", 1)[0] + "="
    return text


def _reasons(conn: Connection, kind: str, w: reports.Window, title: str, doc: str) -> Report:
    folded: dict[tuple[int | None, str], list[Any]] = {}
    for code, detail, n, last in queries.report_event_details(conn, kind, w.since, w.until):
        key = (None if code is None else int(code), fold_reason(kind, detail))
        entry = folded.setdefault(key, [0, 0.0])
        entry[0] += int(n)
        entry[1] = max(entry[1], float(last))
    ranked = sorted(folded.items(), key=lambda kv: (-kv[1][0], kv[0][1]))
    columns = [
        Column("count", "int"),
        Column("code", "int"),
        Column("reason", flex=True),
        Column("last_seen", "time", "LAST SEEN"),
    ]
    report = Report(title, columns, (), since=w.since, until=w.until, generated_at=w.now)
    report.rows = [(n, code, reason, last) for (code, reason), (n, last) in ranked[: w.top]]
    report.more = len(ranked) > w.top
    report.notes.append(doc)
    return report


def _bad_mail(conn: Connection, w: reports.Window) -> Report:
    columns = [
        Column("at", "time", "FAILED"),
        Column("queue_id", title="QUEUE_ID"),
        Column("sender", flex=True),
        Column("code", "int", "EXIT"),
        Column("reason", flex=True),
    ]
    report = Report("bad mail", columns, (), since=w.since, until=w.until, generated_at=w.now)
    rows = queries.report_bad_events(conn, w.since, w.until, w.top + 1)
    report.rows = [
        (at, qid, "-" if frm is None else (frm or "<>"), code, detail)
        for at, qid, code, detail, frm in rows[: w.top]
    ]
    report.more = len(rows) > w.top
    return report


def _traffic(
    conn: Connection, d: Daily, since: float, until: float
) -> list[tuple[float, dict[str, int]]]:
    names = dict(TRAFFIC)
    counts: dict[float, dict[str, int]] = {}
    kinds = [k for k, _ in TRAFFIC]
    for period, kind, n in queries.report_event_buckets(conn, kinds, since, until, d.step):
        counts.setdefault(float(period), {})[names[str(kind)]] = int(n)
    first = since // d.step * d.step
    out = []
    start = first
    while start < until:
        row = counts.get(start, {})
        out.append((start, {name: row.get(name, 0) for _, name in TRAFFIC}))
        start += d.step
    return out


def _materialized(report: Report) -> Report:
    report.rows = [tuple(r) for r in report.rows]
    return report


def collect(
    conn: Connection, since: float, until: float, now: float, host: str, top: int = DEFAULT_TOP
) -> Daily:
    """Gather the daily report for the window [since, until)."""
    d = Daily(since, until, now, host, top)
    w = reports.Window(since, until, now, top)
    kinds = [k for k, _ in TRAFFIC] + list(PROBES) + list(NOTICES)
    d.totals = queries.report_event_totals_between(conn, kinds, since, until)
    for _state, _n, size in queries.report_state_totals(conn, since, until):
        d.received_bytes += int(size)
    counts = queries.count_by_state(conn)
    d.waiting = sum(counts.get(s, 0) for s in ("received", "delivering", "held"))
    d.held = counts.get("held", 0)
    d.deferred_now = queries.report_deferred_count(conn)
    oldest = queries.report_oldest_waiting(conn)
    d.oldest_age = None if oldest is None else now - oldest
    d.traffic = _traffic(conn, d, since, until)
    d.tls = reports.tls_versions(conn, w)
    for build in (reports.senders, reports.recipients, reports.clients):
        d.sections.append(_materialized(build(conn, w)))
    d.sections.append(
        _reasons(
            conn,
            "reject",
            w,
            "refusals by reason",
            "SMTP commands the receiver refused, by reply code and reason",
        )
    )
    d.sections.append(
        _reasons(
            conn,
            "deferred",
            w,
            "deferral reasons",
            "delivery attempts that failed temporarily, by sendmail exit code and output",
        )
    )
    d.sections.append(_bad_mail(conn, w))
    per = "hour" if d.step == HOUR else "day"
    d.latency = [tuple(r) for r in reports.latency(conn, w, per=per).rows]
    age = reports.age(conn, reports.Window(None, None, now, 1))
    total = next(iter(age.rows))
    d.age_labels = [c.name for c in age.columns[2:]]
    d.age_counts = [int(v) for v in list(total)[2:]]
    return d


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def totals_lines(d: Daily) -> list[tuple[str, str]]:
    """(label, value) of the grand totals, in the order both renderers print them."""
    from smapq.report.timespec import human_bytes, human_duration  # noqa: PLC0415

    t = d.totals
    probes = ", ".join(f"{t[k]} {k.upper() if k != 'timeout' else 'timeouts'}" for k in PROBES)
    return [
        ("connections", str(t["connect"])),
        ("received", f"{_n(t['accept'], 'message')}, {human_bytes(d.received_bytes)}"),
        ("delivered", _n(t["delivered"], "message")),
        ("deferred", _n(t["deferred"], "attempt")),
        ("bad", _n(t["bad"], "message")),
        ("bounced", f"{_n(t['bounced'], 'failure notice')}, {_n(t['warned'], 'delay warning')}"),
        ("refused", _n(t["reject"], "command")),
        ("probes", probes),
        ("TLS", tls_line(d)),
        (
            "waiting now",
            f"{_n(d.waiting, 'message')} ({d.deferred_now} deferred, {d.held} held)"
            + (f", oldest {human_duration(d.oldest_age)}" if d.oldest_age is not None else ""),
        ),
    ]


def tls_line(d: Daily) -> str:
    """The share of connections that switched to TLS, by version."""
    connections = d.totals["connect"]
    tls = sum(n for _, n in d.tls)
    if not connections:
        return "no connection"

    def pct(n: int) -> str:
        return f"{100 * n / connections:.0f}%"

    line = f"{pct(tls)} of connections ({_n(tls, 'session')})"
    if d.tls:
        line += ": " + ", ".join(f"{version} {pct(n)}" for version, n in d.tls)
    return line


def traffic_report(d: Daily) -> Report:
    """The per-period counts as a Report, for the text renderer and the HTML table."""
    names = [name for _, name in TRAFFIC]
    columns = [Column("period", "time", "HOUR" if d.step == HOUR else "DAY")]
    titles = {"connections": "CONN", "received": "RCVD", "delivered": "DELIV"}
    columns += [Column(n, "int", titles.get(n, n.upper())) for n in names]
    report = Report("traffic", columns, (), since=d.since, until=d.until, generated_at=d.now)
    report.rows = [(start, *(c[n] for n in names)) for start, c in d.traffic]
    return report


def latency_report(d: Daily) -> Report:
    columns = [
        Column("period", "time", "HOUR" if d.step == HOUR else "DAY"),
        Column("delivered", "int"),
        Column("p50", "duration"),
        Column("p90", "duration"),
        Column("p99", "duration"),
        Column("max", "duration"),
    ]
    report = Report("latency", columns, (), since=d.since, until=d.until, generated_at=d.now)
    report.rows = list(d.latency)
    return report


def sections(d: Daily) -> Sequence[tuple[str, Report]]:
    """(heading, report) of every table after the totals, in print order."""
    titles = {
        "senders": "Top senders",
        "recipients": "Top recipients",
        "clients": "Top clients",
        "refusals by reason": "Refusals by reason",
        "deferral reasons": "Deferral reasons",
        "bad mail": "Mail that went bad",
    }
    per = "hour" if d.step == HOUR else "day"
    out: list[tuple[str, Report]] = [(f"Traffic per {per} (UTC)", traffic_report(d))]
    out += [(titles[r.name], r) for r in d.sections]
    out.append((f"Delivery latency per {per}", latency_report(d)))
    return out


def age_pairs(d: Daily) -> Iterable[tuple[str, int]]:
    return zip(d.age_labels, d.age_counts, strict=True)
