"""The ``smapq report`` audits: each a function from a read-only connection to a Report.

Purpose: questions that used to need grep over smap's syslog lines and a look at the
spool directory, answered from ``messages``, ``recipients`` and ``events``.

Clocks: a window [since, until) applies to the time a report is about -- receipt
(summary counts, senders, recipients, clients, age, deferred), delivery (latency),
failure (bad: ``updated_at``) and the envelope log (sessions, refused, "bad in window").

Memory: aggregation happens in SQL with ``LIMIT top``; the two reports that need every
row (latency percentiles, the qshape age grid) stream them and keep one bucket or one
counter per domain.

Security: read-only; callers pass a connection from a ``readonly=True`` engine.
Diagnostics: bad arguments raise ``UsageError``; database errors are turned into one
line by ``smapq.report.db``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection

from smapq.errors import UsageError
from smapq.report.output import Column, Report, cell
from smapq.store import queries, states

DEFAULT_TOP = 20
DEFAULT_LIST = 50
# qshape's default buckets, in minutes: 5 10 20 ... 1280, then older.
AGE_BUCKETS = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


class Window:
    """The arguments every report shares."""

    __slots__ = ("now", "since", "top", "until")

    def __init__(
        self, since: float | None, until: float | None, now: float, top: int = DEFAULT_TOP
    ) -> None:
        if top < 1:
            raise UsageError(f"--top: {top} must be at least 1")
        self.since = since
        self.until = until
        self.now = now
        self.top = top


def _report(name: str, columns: Sequence[Column], w: Window) -> Report:
    return Report(name, columns, (), since=w.since, until=w.until, generated_at=w.now)


def _sender(addr: str | None) -> str:
    return "<>" if addr == "" else (addr or "-")


# --- summary ------------------------------------------------------------------------

_UNIT_SHOWN = {"messages": "int", "bytes": "bytes", "seconds": "duration"}
# For people: what each line counts. The state lines are messages as they are now; the
# *_in_window lines count events, so mail that went bad and was then requeued, deleted
# or purged is in bad_in_window but no longer in bad.
SUMMARY_MEANING = {
    states.RECEIVED: "waiting for a first try or a retry",
    states.DELIVERING: "being delivered now",
    states.DELIVERED: "delivered (rows not yet purged)",
    states.BAD: "in state bad now",
    states.HELD: "on hold until released",
    "total": "messages in the database",
    "bytes": "their size",
    "deferred": "now: waiting for a retry",
    "oldest_waiting_age": "now: oldest not delivered or bad",
    "delivered_in_window": "deliveries in the window",
    "bad_in_window": "went bad in the window, even if requeued",
    "bounces_in_window": "failure notices (DSNs) queued to senders",
    "warnings_in_window": "delay warnings (DSNs) queued to senders",
}


def summary(conn: Connection, w: Window) -> Report:
    """Messages per state, deferred, oldest waiting, bytes, delivered and bad in window."""
    columns = [
        Column("metric"),
        Column("value", "int", table=False),
        Column("shown", "text", title="VALUE", data=False),
        Column("unit"),
        Column("meaning", data=False, flex=True),
    ]
    report = _report("summary", columns, w)
    by_state = dict.fromkeys(states.STATES, (0, 0))
    for state, n, size in queries.report_state_totals(conn, w.since, w.until):
        by_state[str(state)] = (int(n), int(size))
    oldest = queries.report_oldest_waiting(conn)
    metrics: list[tuple[str, int, str]] = [(s, by_state[s][0], "messages") for s in states.STATES]
    metrics += [
        ("total", sum(n for n, _ in by_state.values()), "messages"),
        ("bytes", sum(b for _, b in by_state.values()), "bytes"),
        ("deferred", queries.report_deferred_count(conn), "messages"),
        ("oldest_waiting_age", 0 if oldest is None else int(w.now - oldest), "seconds"),
        (
            "delivered_in_window",
            queries.report_delivered_count(conn, w.since, w.until),
            "messages",
        ),
        ("bad_in_window", queries.report_event_count(conn, "bad", w.since, w.until), "messages"),
    ]
    went_bad, now_bad = metrics[-1][1], by_state[states.BAD][0]
    notices = (("bounces_in_window", "bounced"), ("warnings_in_window", "warned"))
    metrics += [
        (name, queries.report_event_count(conn, kind, w.since, w.until), "messages")
        for name, kind in notices
    ]
    report.rows = [(m, v, cell(_UNIT_SHOWN[u], v), u, SUMMARY_MEANING[m]) for m, v, u in metrics]
    if w.since is not None or w.until is not None:
        report.notes.append(
            "state counts cover mail received in the window; deferred and oldest are now"
        )
    if went_bad != now_bad:
        windowed = w.since is not None or w.until is not None
        report.notes.append(
            f"bad ({now_bad}) is messages in state bad now"
            + (", received in the window" if windowed else "")
            + f"; bad_in_window ({went_bad}) is failures "
            + ("in the window" if windowed else "ever recorded")
            + ", including messages requeued, deleted or purged since"
        )
    return report


# --- top lists ----------------------------------------------------------------------


def senders(conn: Connection, w: Window) -> Report:
    """The ``top`` senders by messages and the ``top`` by refusals (<= 2 x top)."""
    columns = [
        Column("sender", flex=True),
        Column("messages", "int", "MSGS"),
        Column("bytes", "bytes"),
        Column("refused", "int", "REFUSED"),
    ]
    report = _report("senders", columns, w)
    top = list(queries.report_top_senders(conn, w.since, w.until, w.top))
    # As for clients: a sender whose every transaction was refused has no message.
    listed = {r[0] for r in top}
    refusing = queries.report_top_refused_senders(conn, w.since, w.until, w.top)
    extra = [str(addr) for addr, _ in refusing if addr not in listed]
    top += queries.report_sender_totals(conn, extra, w.since, w.until)
    refused = queries.report_refused_counts(
        conn, "sender", [str(r[0]) for r in top], w.since, w.until
    )
    rows = [(addr, int(n), int(b or 0), refused.get(str(addr), 0)) for addr, n, b in top]
    rows.sort(key=lambda r: (-(r[1] + r[3]), str(r[0])))
    report.rows = [(_sender(addr), *rest) for addr, *rest in rows]
    return report


def recipients(conn: Connection, w: Window) -> Report:
    columns = [
        Column("recipient", flex=True),
        Column("messages", "int", "MSGS"),
        Column("bytes", "bytes"),
        Column("refused", "int", "REFUSED"),
    ]
    report = _report("recipients", columns, w)
    top = queries.report_top_recipients(conn, w.since, w.until, w.top)
    refused = queries.report_refused_counts(
        conn, "recipient", [str(r[0]) for r in top], w.since, w.until
    )
    report.rows = [(addr, int(n), int(b or 0), refused.get(str(addr), 0)) for addr, n, b in top]
    return report


def clients(conn: Connection, w: Window) -> Report:
    """The ``top`` clients by messages and the ``top`` by refused commands (<= 2 x top)."""
    columns = [
        Column("client_addr", title="CLIENT"),
        Column("client_name", title="NAME", flex=True),
        Column("messages", "int", "MSGS"),
        Column("bytes", "bytes"),
        Column("refused", "int", "REFUSED"),
    ]
    report = _report("clients", columns, w)
    top = list(queries.report_top_clients(conn, w.since, w.until, w.top))
    # A client that was only ever refused sent no message, yet it is the one an audit
    # looks for: the N most refused clients join the N busiest.
    listed = {r[0] for r in top}
    refusing = queries.report_top_refused_clients(conn, w.since, w.until, w.top)
    extra = [str(addr) for addr, _ in refusing if addr not in listed]
    top += queries.report_client_totals(conn, extra, w.since, w.until)
    keys = [str(r[0]) for r in top if r[0] is not None]
    refused = queries.report_refused_counts(conn, "client_addr", keys, w.since, w.until)
    rows = [
        (addr, name, int(n), int(b or 0), refused.get(str(addr), 0)) for addr, name, n, b in top
    ]
    rows.sort(key=lambda r: (-(r[2] + r[4]), r[0] is None, str(r[0])))
    report.rows = rows
    return report


# --- latency ------------------------------------------------------------------------

PERIODS = {"hour": 3600, "day": 86400}


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of a sorted, non-empty sequence."""
    rank = max(1, math.ceil(p * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency_rows(rows: Iterable[Any], step: int) -> Iterator[tuple[Any, ...]]:
    # A hot loop over every delivery in the window: no per-row function calls beyond
    # the list append; a period is flushed when the first later delivery shows up.
    start = 0.0
    edge = -math.inf
    values: list[float] = []
    append = values.append
    for delivered_at, seconds in rows:
        if delivered_at >= edge:
            if values:
                values.sort()
                yield _period(start, values)
            start = delivered_at // step * step
            edge = start + step
            values = []
            append = values.append
        append(seconds)
    if values:
        values.sort()
        yield _period(start, values)


def _period(start: float, values: list[float]) -> tuple[Any, ...]:
    """(period, n, p50, p90, p99, max) of one period's sorted latencies."""
    return (
        start,
        len(values),
        _percentile(values, 0.5),
        _percentile(values, 0.9),
        _percentile(values, 0.99),
        values[-1],
    )


def latency(conn: Connection, w: Window, per: str | None = None) -> Report:
    """Receipt-to-delivery percentiles per hour or day (default: hour up to two days)."""
    if per is None:
        span = (w.until or w.now) - (w.since if w.since is not None else 0)
        per = "hour" if span <= 2 * 86400 else "day"
    if per not in PERIODS:
        raise UsageError(f"--per: {per!r} is not one of {', '.join(PERIODS)}")
    columns = [
        Column("period", "time"),
        Column("delivered", "int"),
        Column("p50", "duration"),
        Column("p90", "duration"),
        Column("p99", "duration"),
        Column("max", "duration"),
    ]
    report = _report("latency", columns, w)
    report.notes.append(f"one row per {per} (UTC) of delivery time")
    step = PERIODS[per]
    done = queries.report_latency_periods(conn, w.since, w.until, step)
    if done is not None:
        report.rows = [tuple(r) for r in done]
    else:
        report.rows = _latency_rows(queries.report_latencies(conn, w.since, w.until), step)
    return report


# --- age (qshape) -------------------------------------------------------------------


def _domain(address: str) -> str:
    at = address.rfind("@")
    return address[at + 1 :].lower().rstrip(">") if at >= 0 else "(local)"


def age(conn: Connection, w: Window, queue_states: Sequence[str] = ()) -> Report:
    """qshape: waiting recipients by domain (rows) and age bucket in minutes (columns)."""
    chosen = list(queue_states) or [states.RECEIVED, states.DELIVERING]
    for s in chosen:
        if s not in states.WAITING:
            raise UsageError(
                f"--state: {s!r} is not a waiting state ({', '.join(states.WAITING)})"
            )
    labels = [f"{b}m" for b in AGE_BUCKETS] + [f"{AGE_BUCKETS[-1]}m+"]
    columns = [Column("domain", flex=True), Column("total", "int", "T")]
    columns += [Column(label, "int", label.replace("m", "")) for label in labels]
    report = _report("age", columns, w)
    limits = [b * 60 for b in AGE_BUCKETS]
    grid: dict[str, list[int]] = {}
    total = [0] * (len(labels) + 1)
    for received_at, address in queries.report_waiting_recipients(conn, chosen, w.since, w.until):
        row = grid.setdefault(_domain(str(address)), [0] * (len(labels) + 1))
        age_s = w.now - float(received_at)
        col = next((i for i, lim in enumerate(limits) if age_s <= lim), len(limits))
        for counts in (row, total):
            counts[0] += 1
            counts[col + 1] += 1
    ranked = sorted(grid.items(), key=lambda kv: (-kv[1][0], kv[0]))
    report.rows = [("TOTAL", *total)] + [(d, *c) for d, c in ranked[: w.top]]
    report.more = len(ranked) > w.top
    report.notes.append(f"recipients in state {'/'.join(chosen)}; columns are minutes")
    return report


# --- deferred and bad lists ---------------------------------------------------------


def deferred(conn: Connection, w: Window) -> Report:
    """Messages waiting for a retry (received with attempts > 0), oldest first."""
    columns = [
        Column("queue_id", title="QUEUE_ID"),
        Column("received_at", "time", table=False),
        Column("age", "duration"),
        Column("attempts", "int", "ATT"),
        Column("next_attempt_at", "time", table=False),
        Column("next_in", "duration", "NEXT"),
        Column("recipients", "int", "RCPT"),
        Column("sender", flex=True),
        Column("last_exit", "int", "EXIT"),
        Column("last_result", title="RESULT", flex=True),
    ]
    report = _report("deferred", columns, w)
    rows = queries.report_deferred_list(conn, w.since, w.until, w.top + 1)
    report.rows = [
        (qid, rcv, w.now - rcv, att, nxt, nxt - w.now, nr, _sender(frm), ex, res)
        for qid, rcv, att, nxt, ex, res, frm, nr in rows[: w.top]
    ]
    report.more = len(rows) > w.top
    return report


def bad(conn: Connection, w: Window) -> Report:
    """Messages in state bad, most recent failure first."""
    columns = [
        Column("queue_id", title="QUEUE_ID"),
        Column("received_at", "time", table=False),
        Column("failed_at", "time", table=False),
        Column("failed_ago", "duration", "FAILED"),
        Column("attempts", "int", "ATT"),
        Column("recipients", "int", "RCPT"),
        Column("sender", flex=True),
        Column("last_exit", "int", "EXIT"),
        Column("last_result", title="RESULT", flex=True),
    ]
    report = _report("bad", columns, w)
    rows = queries.report_bad_list(conn, w.since, w.until, w.top + 1)
    report.rows = [
        (qid, rcv, upd, w.now - upd, att, nr, _sender(frm), ex, res)
        for qid, rcv, upd, att, ex, res, frm, nr in rows[: w.top]
    ]
    report.more = len(rows) > w.top
    return report


# --- the envelope log: sessions and refusals ----------------------------------------


def sessions(conn: Connection, w: Window) -> Report:
    """Per client: connections, accepted messages, refusals, VRFY/EXPN, timeouts."""
    columns = [
        Column("client_addr", title="CLIENT", flex=True),
        Column("connections", "int", "CONN"),
        Column("accepted", "int", "ACCEPT"),
        Column("refused", "int", "REFUSED"),
        Column("vrfy", "int"),
        Column("expn", "int"),
        Column("timeouts", "int", "TIMEOUT"),
        Column("last_seen", "time", "LAST SEEN"),
    ]
    report = _report("sessions", columns, w)
    report.rows = [tuple(r) for r in queries.report_sessions(conn, w.since, w.until, w.top)]
    return report


def refused(conn: Connection, w: Window) -> Report:
    """Refused commands, VRFY/EXPN probes and timeouts by client, most frequent first."""
    columns = [
        Column("client_addr", title="CLIENT"),
        Column("kind"),
        Column("code", "int"),
        Column("count", "int"),
        Column("last_seen", "time", "LAST SEEN"),
        Column("detail", table=False),
        Column("address", table=False),
        # For people: which address the latest refusal named, and why.
        Column("sample", title="SAMPLE", flex=True, data=False),
    ]
    report = _report("refused", columns, w)
    report.rows = [
        (*r[:5], r[5], r[6], ": ".join(str(x) for x in (r[6], r[5]) if x) or None)
        for r in queries.report_refused(conn, w.since, w.until, w.top)
    ]
    return report


REPORTS = {
    "summary": summary,
    "senders": senders,
    "recipients": recipients,
    "clients": clients,
    "deferred": deferred,
    "bad": bad,
    "sessions": sessions,
    "refused": refused,
}
