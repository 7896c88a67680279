"""The reports' statements: totals, rankings, latencies, the daily summary, ``report sql``.

Purpose: the read side (reports, metrics, ``report daily``). Every function takes a
read-only connection (``smapq.report.db.readonly_session``). Windows are half-open
[since, until) on the report's natural clock. Plans are chosen for a million-message
queue (docs/reports.md): rankings come from covering indexes, and where SQLite's
planner needs fixing (join order, index choice) the dialect supplies the hints.

Security: ``guard_operator_sql`` wraps the operator's own statement so the database
refuses writes (an SQLite authorizer; a READ ONLY transaction on PostgreSQL) -- not a
filter on the statement text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Float,
    Select,
    bindparam,
    cast,
    func,
    literal,
    or_,
    select,
    text,
    true,
)

from smapq.store import states
from smapq.store.dialects import dialect_of
from smapq.store.queries.common import recipient_count, window
from smapq.store.schema import events, messages, recipients

REFUSAL_KINDS = ("reject", "vrfy", "expn", "timeout")


def _top(key: Any, *extra: Any, where: Sequence[Any], top: int) -> Select[Any]:
    """The rankings' one shape: ``key``, its rows (``n``) and ``extra`` aggregates over
    the rows ``where`` holds, the ``top`` keys by rows, ties by key."""
    n = func.count().label("n")
    return select(key, n, *extra).where(*where).group_by(key).order_by(n.desc(), key).limit(top)


def _kind_is(col: Any, kind: str) -> Any:
    """``col = 'kind'`` with the kind in the statement's text, not a parameter: only then
    may the planners use the partial indexes on one kind (ix_events_reject,
    ix_events_mail; PostgreSQL's generic plan of a prepared statement cannot either)."""
    return col == literal(kind, literal_execute=True)


def report_state_totals(
    conn: Connection, since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(state, messages, bytes) of messages received in the window."""
    m = messages.c
    stmt = (
        select(m.state, func.count(), func.coalesce(func.sum(m.size), 0))
        .where(*window(m.received_at, since, until))
        .group_by(m.state)
    )
    return list(conn.execute(stmt))


def report_deferred_count(conn: Connection) -> int:
    m = messages.c
    stmt = select(func.count()).where(m.state == states.RECEIVED, m.attempts > 0)
    return int(conn.execute(stmt).scalar_one())


def report_oldest_waiting(conn: Connection) -> float | None:
    """received_at of the oldest message not yet delivered or bad (held included)."""
    # One seek per state into ix_messages_state_received: with ``state IN (...)``
    # PostgreSQL walked ix_messages_received_at from the oldest row, through every
    # delivered message (waiting mail sits at the end of that order).
    m = messages.c
    found = [
        conn.execute(select(func.min(m.received_at)).where(m.state == state)).scalar_one()
        for state in states.WAITING
    ]
    present = [float(v) for v in found if v is not None]
    return min(present) if present else None


def report_delivered_count(conn: Connection, since: float | None, until: float | None) -> int:
    m = messages.c
    stmt = select(func.count()).where(
        m.delivered_at.is_not(None), *window(m.delivered_at, since, until)
    )
    return int(conn.execute(stmt).scalar_one())


def report_event_count(
    conn: Connection, kind: str, since: float | None, until: float | None
) -> int:
    e = events.c
    stmt = select(func.count()).where(e.kind == kind, *window(e.at, since, until))
    return int(conn.execute(stmt).scalar_one())


def report_top_senders(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(sender, messages, bytes), most messages first."""
    m = messages.c
    stmt = _top(m.mail_from, func.sum(m.size), where=window(m.received_at, since, until), top=top)
    return list(conn.execute(stmt))


# SQLAlchemy renders no FROM hints for SQLite, so the recipient joins are text: they
# read (received_at, size) through ix_messages_id_cover instead of the table rows,
# whose inline bodies made 1.3M lookups take seconds.
# Recipient rankings for a window. CROSS JOIN fixes SQLite's join order. A narrow
# window is driven from the messages received in it. A wide one uses the fact that ids
# follow receipt order: count straight from ix_recipients_address (address, message_id)
# over the id range [lo, hi] of the window's messages, then subtract the "strays" --
# messages inside that id range received outside the window (imported mail, clock
# steps). Exact either way, and index-only.
# The narrow plan's r.message_id range is implied by the join (lo and hi are the
# window's own ids); it lets PostgreSQL read the window's recipients by
# ix_recipients_message_id instead of hashing the whole table (0.5 s -> 0.2 s for 1d).
_RCPT_TOP_INSIDE = """
SELECT r.address, count(*) AS n
FROM messages AS m {hint} {cross} recipients AS r ON r.message_id = m.id
WHERE m.received_at >= :since AND m.received_at < :until
  AND r.message_id BETWEEN :lo AND :hi
GROUP BY r.address ORDER BY n DESC, r.address LIMIT :top
"""
_RCPT_TOP_BY_ID_RANGE = """
WITH strays AS (
  SELECT m.id FROM messages AS m {id_hint}
  WHERE m.id BETWEEN :lo AND :hi
    AND NOT (m.received_at >= :since AND m.received_at < :until)
), gone AS (
  SELECT r.address, count(*) AS n FROM strays {cross} recipients AS r
    ON r.message_id = strays.id GROUP BY r.address
), kept AS (
  SELECT r.address, count(*) AS n FROM recipients AS r {addr_hint}
  WHERE r.message_id BETWEEN :lo AND :hi GROUP BY r.address
)
SELECT kept.address, kept.n - coalesce(gone.n, 0) AS n
FROM kept LEFT JOIN gone ON gone.address = kept.address
WHERE kept.n > coalesce(gone.n, 0)
ORDER BY n DESC, kept.address LIMIT :top
"""
_RCPT_BYTES = """
SELECT r.address, sum(m.size) AS bytes
FROM recipients AS r {cross} messages AS m {hint} ON m.id = r.message_id
WHERE r.address IN :addresses AND m.received_at >= :since AND m.received_at < :until
GROUP BY r.address
"""
_NO_LOWER = -1.0
_NO_UPPER = 1e18


def report_top_recipients(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(recipient, messages, bytes), most messages first.

    Ranks by count with index-only plans (see the SQL above for the choice), then adds
    bytes for the winners only, through ix_messages_id_cover.
    """
    dialect = dialect_of(conn)
    hints = dialect.join_hints()
    params = {
        "since": _NO_LOWER if since is None else since,
        "until": _NO_UPPER if until is None else until,
        "top": top,
    }
    r = recipients.c
    # All time and the id-range plan walk all of ix_recipients_address: ~10^5 groups
    # that the index delivers in order (hashing them took PostgreSQL 3x as long).
    in_index_order = True
    if since is None and until is None:
        stmt: Any = _top(r.address, where=(), top=top)
    else:
        m = messages.c
        inside, lo, hi = conn.execute(
            select(func.count(), func.min(m.id), func.max(m.id)).where(
                *window(m.received_at, since, until)
            )
        ).one()
        # The id span of the whole table stands in for its row count (an upper bound
        # where ids have gaps): two index seeks instead of a count of every row.
        first, last = conn.execute(select(func.min(m.id), func.max(m.id))).one()
        everything = 0 if first is None else int(last) - int(first) + 1
        # Messages in the id range but not in the window (ids may have gaps: an upper
        # bound). Many of them (just after a big import-spool) favour the other plan.
        strays = 0 if not inside else int(hi) - int(lo) + 1 - int(inside)
        narrow = inside * 8 <= everything or strays > inside
        sql = _RCPT_TOP_INSIDE if narrow else _RCPT_TOP_BY_ID_RANGE
        params.update(lo=int(lo or 1), hi=int(hi or 0))
        stmt = text(sql.format(**hints))
        in_index_order = not narrow
    with dialect.index_grouping(conn) if in_index_order else nullcontext():
        ranked = [(str(a), int(c)) for a, c in conn.execute(stmt, params)]
    if not ranked:
        return []
    by_bytes = text(_RCPT_BYTES.format(cross=hints["cross"], hint=hints["bytes_hint"])).bindparams(
        bindparam("addresses", expanding=True)
    )
    found = conn.execute(by_bytes, {**params, "addresses": [a for a, _ in ranked]})
    sizes: dict[str, int] = {str(a): int(b or 0) for a, b in found}
    return [(a, cnt, sizes.get(a, 0)) for a, cnt in ranked]


def report_top_clients(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(client_addr, latest client_name, messages, bytes), most messages first."""
    m = messages.c
    stmt = _top(
        m.client_addr, func.sum(m.size), where=window(m.received_at, since, until), top=top
    )
    ranked = list(conn.execute(stmt))
    return [
        (addr, None if addr is None else _latest_client_name(conn, addr), cnt, size)
        for addr, cnt, size in ranked
    ]


def report_top_refused_clients(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(client_addr, reject events), most refused first; from ix_events_kind_client."""
    e = events.c
    where = [e.kind == "reject", e.client_addr.is_not(None), *window(e.at, since, until)]
    return list(conn.execute(_top(e.client_addr, where=where, top=top)))


def report_client_totals(
    conn: Connection, addrs: Sequence[str], since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(client_addr, latest client_name, messages, bytes) for the given clients."""
    out: list[Sequence[Any]] = []
    for addr in addrs:
        cnt, size = _messages_and_bytes(conn, messages.c.client_addr, addr, since, until)
        out.append((addr, _latest_client_name(conn, addr), cnt, size))
    return out


def _messages_and_bytes(
    conn: Connection, column: Any, key: str, since: float | None, until: float | None
) -> tuple[int, int]:
    """(messages, bytes) received in the window whose ``column`` equals ``key``."""
    m = messages.c
    cnt, size = conn.execute(
        select(func.count(), func.coalesce(func.sum(m.size), 0)).where(
            column == key, *window(m.received_at, since, until)
        )
    ).one()
    return int(cnt), int(size)


def _latest_client_name(conn: Connection, addr: str) -> str | None:
    m = messages.c
    latest = (
        select(m.client_name).where(m.client_addr == addr).order_by(m.received_at.desc()).limit(1)
    )
    name = conn.execute(latest).scalar()
    return None if name is None else str(name)


def _sender_stage(e: Any) -> Any:
    """The reject named the sender of its own session's MAIL (e.g. 552 after DATA).

    The receiver's reject events put the refused address in ``address`` without
    saying which command was refused; a MAIL event of the same session with that
    address tells a sender's refusal from a recipient's.
    """
    mail = events.alias("mail_ev")
    return (
        select(mail.c.id)
        .where(
            mail.c.session_id == e.session_id,
            _kind_is(mail.c.kind, "mail"),
            mail.c.address == e.address,
        )
        .exists()
    )


def report_refused_counts(
    conn: Connection,
    by: str,
    keys: Sequence[str],
    since: float | None,
    until: float | None,
) -> dict[str, int]:
    """Refused commands (reject events) per key, for keys.

    ``by``: 'client_addr' (from that client), 'sender' (refused in a transaction of
    that sender, naming it) or 'recipient' (naming that address, not as its sender).
    """
    if not keys:
        return {}
    e = events.c
    col = e.client_addr if by == "client_addr" else e.address
    # By client: ix_events_kind_client; by address: ix_events_reject.
    kind = e.kind == "reject" if by == "client_addr" else _kind_is(e.kind, "reject")
    conds = [kind, col.in_(list(keys)), *window(e.at, since, until)]
    if by == "sender":
        conds.append(_sender_stage(e))
    elif by == "recipient":
        conds.append(~_sender_stage(e))
    stmt = select(col, func.count()).where(*conds).group_by(col)
    return {str(k): int(v) for k, v in conn.execute(stmt)}


def report_top_refused_senders(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(sender, refusals), most first: senders refused in their own transactions.

    From ix_events_reject, each checked against its session's MAIL in ix_events_mail.
    """
    e = events.c
    where = [
        _kind_is(e.kind, "reject"),
        e.address.is_not(None),
        *window(e.at, since, until),
        _sender_stage(e),
    ]
    return list(conn.execute(_top(e.address, where=where, top=top)))


def report_sender_totals(
    conn: Connection, senders: Sequence[str], since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(sender, messages, bytes) for the given senders, from ix_messages_mail_from."""
    return [
        (sender, *_messages_and_bytes(conn, messages.c.mail_from, sender, since, until))
        for sender in senders
    ]


LATENCY_FRACTIONS = (0.5, 0.9, 0.99)


def report_latency_periods(
    conn: Connection, since: float | None, until: float | None, step: int
) -> list[Sequence[Any]] | None:
    """(period start, deliveries, p50, p90, p99, max) per ``step`` seconds of delivery
    time, computed by the server where it can; None where it cannot (SQLite: stream
    ``report_latencies`` and rank in Python instead).

    PostgreSQL's ``percentile_disc(p)`` is the nearest-rank rule the report uses (the
    value at rank ceil(p * n), the first for p * n <= 1), so both paths give the same
    numbers; this one moves 31 rows instead of a million.

    One range of ix_messages_delivered_at per period (a LATERAL subquery), each
    sorted on its own for the percentiles: a GROUP BY on an expression of
    delivered_at made PostgreSQL sort all the window's rows first (on disk, at a
    million; 0.9 s -> 0.5 s). The range [start, start + step) holds exactly the
    deliveries whose floor(delivered_at / step) * step is start.
    """
    dialect = dialect_of(conn)
    if not dialect.ordered_set_aggregates:
        return None
    m = messages.c
    in_window = [m.delivered_at.is_not(None), *window(m.delivered_at, since, until)]
    first, last = conn.execute(
        select(func.min(m.delivered_at), func.max(m.delivered_at)).where(*in_window)
    ).one()
    if first is None:
        return []
    # Period starts are whole seconds; BigInteger, as epoch seconds outgrow int4 in 2038.
    starts = (
        func.generate_series(
            literal(int(first // step) * step, BigInteger),
            literal(int(last // step) * step, BigInteger),
            literal(step, BigInteger),
        )
        .table_valued("start")
        .render_derived(name="starts")
    )
    start = starts.c.start
    seconds = m.delivered_at - m.received_at
    period = (
        select(
            func.count().label("n"),
            *(
                func.percentile_disc(p).within_group(seconds).label(f"p{i}")
                for i, p in enumerate(LATENCY_FRACTIONS)
            ),
            func.max(seconds).label("longest"),
        )
        .where(*in_window, m.delivered_at >= start, m.delivered_at < start + step)
        .lateral("period")
    )
    stmt = (
        select(
            cast(start, Float),
            period.c.n,
            *(period.c[f"p{i}"] for i in range(len(LATENCY_FRACTIONS))),
            period.c.longest,
        )
        .select_from(starts.join(period, true()))
        .where(period.c.n > 0)
        .order_by(start)
    )
    return list(conn.execute(stmt))


def report_latencies(
    conn: Connection, since: float | None, until: float | None
) -> Iterable[Sequence[Any]]:
    """(delivered_at, seconds from receipt to delivery) in delivery order, streamed.

    The one report that must see every row (exact percentiles). On SQLite the rows come
    from the driver cursor of this same read-only connection: SQLAlchemy's row objects
    cost more than the query itself at a million rows.
    """
    m = messages.c
    stmt = (
        select(m.delivered_at, m.delivered_at - m.received_at)
        .where(m.delivered_at.is_not(None), *window(m.delivered_at, since, until))
        .order_by(m.delivered_at)
    )
    return dialect_of(conn).stream(conn, stmt)


def report_waiting_recipients(
    conn: Connection, queue_states: Sequence[str], since: float | None, until: float | None
) -> Iterable[Sequence[Any]]:
    """(received_at, recipient address) of every recipient still waiting, streamed."""
    m, r = messages.c, recipients.c
    stmt = (
        select(m.received_at, r.address)
        .select_from(messages.join(recipients, r.message_id == m.id))
        .where(
            m.state.in_(list(queue_states)),
            r.sent_at.is_(None),
            *window(m.received_at, since, until),
        )
    )
    return conn.execution_options(stream_results=True).execute(stmt)


def report_deferred_list(
    conn: Connection, since: float | None, until: float | None, limit: int
) -> list[Sequence[Any]]:
    """Deferred messages (received, attempts > 0), oldest first."""
    m = messages.c
    stmt = (
        select(
            m.queue_id,
            m.received_at,
            m.attempts,
            m.next_attempt_at,
            m.last_exit,
            m.last_result,
            m.mail_from,
            recipient_count(),
        )
        .where(m.state == states.RECEIVED, m.attempts > 0)
        .where(*window(m.received_at, since, until))
        .order_by(m.received_at, m.id)
        .limit(limit)
    )
    return list(conn.execute(stmt))


def report_bad_list(
    conn: Connection, since: float | None, until: float | None, limit: int
) -> list[Sequence[Any]]:
    """Messages in state bad, most recently failed first (window on updated_at)."""
    m = messages.c
    stmt = (
        select(
            m.queue_id,
            m.received_at,
            m.updated_at,
            m.attempts,
            m.last_exit,
            m.last_result,
            m.mail_from,
            recipient_count(),
        )
        .where(m.state == states.BAD, *window(m.updated_at, since, until))
        .order_by(m.updated_at.desc(), m.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt))


SESSION_KINDS = ("connect", "accept", "reject", "vrfy", "expn", "timeout", "tls")
TLS_DONE = 220  # the code of a tls event whose handshake succeeded


def report_sessions(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """Per client: connections, accepted, refused, vrfy, expn, timeouts, TLS sessions
    (handshakes that succeeded), last seen.

    Ranks clients by connections from ix_events_kind_client alone (grouped in index
    order, no sort of millions of events), then counts the other kinds for the winners.
    """
    e = events.c
    where = [e.kind == "connect", *window(e.at, since, until)]
    ranked = list(conn.execute(_top(e.client_addr, where=where, top=top)))
    clients = [c for c, _ in ranked if c is not None]
    counts: dict[tuple[Any, str], int] = {}
    last: dict[Any, float] = {}
    if clients:
        stmt = (
            select(e.client_addr, e.kind, func.count(), func.max(e.at))
            .where(
                e.kind.in_(SESSION_KINDS),
                or_(e.kind != "tls", e.code == TLS_DONE),
                e.client_addr.in_(clients),
                *window(e.at, since, until),
            )
            .group_by(e.client_addr, e.kind)
        )
        for client, kind, cnt, at in conn.execute(stmt):
            counts[(client, kind)] = int(cnt)
            last[client] = max(float(at), last.get(client, 0.0))
    return [
        (c, cnt, *(counts.get((c, k), 0) for k in SESSION_KINDS[1:]), last.get(c))
        for c, cnt in ranked
    ]


def report_tls(conn: Connection, since: float | None, until: float | None) -> list[Sequence[Any]]:
    """(detail "VERSION CIPHER", sessions, last seen) of STARTTLS handshakes that
    succeeded in the window, most first."""
    e = events.c
    n = func.count().label("n")
    stmt = (
        select(e.detail, n, func.max(e.at))
        .where(e.kind == "tls", e.code == TLS_DONE, *window(e.at, since, until))
        .group_by(e.detail)
        .order_by(n.desc(), e.detail)
    )
    return list(conn.execute(stmt))


def report_refused(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(client, kind, code, count, last seen, latest detail, its address), most first.

    Grouped from ix_events_kind_client alone; the sample is read for the winners only.
    """
    e = events.c
    n = func.count().label("n")
    ranked = list(
        conn.execute(
            select(e.client_addr, e.kind, e.code, n, func.max(e.at))
            .where(e.kind.in_(REFUSAL_KINDS), *window(e.at, since, until))
            .group_by(e.client_addr, e.kind, e.code)
            .order_by(n.desc(), e.client_addr, e.kind, e.code)
            .limit(top)
        )
    )
    out: list[Sequence[Any]] = []
    for client, kind, code, cnt, last in ranked:
        sample = (
            select(e.detail, e.address)
            .where(e.kind == kind, e.client_addr == client, e.at == last)
            .where(e.code.is_(None) if code is None else e.code == code)
            .limit(1)
        )
        detail, address = conn.execute(sample).one_or_none() or (None, None)
        out.append((client, kind, code, cnt, last, detail, address))
    return out


def report_attempts_histogram(conn: Connection) -> list[Sequence[Any]]:
    """(attempts, messages) over waiting messages."""
    m = messages.c
    stmt = (
        select(m.attempts, func.count())
        .where(m.state.in_(states.WAITING))
        .group_by(m.attempts)
        .order_by(m.attempts)
    )
    return list(conn.execute(stmt))


def report_event_totals(conn: Connection, kinds: Sequence[str]) -> dict[str, int]:
    """All-time count of each event kind (Prometheus counters)."""
    e = events.c
    stmt = select(e.kind, func.count()).where(e.kind.in_(list(kinds))).group_by(e.kind)
    found = {str(k): int(n) for k, n in conn.execute(stmt)}
    return {k: found.get(k, 0) for k in kinds}


# --- the daily summary (smapq report daily) -----------------------------------------


def report_event_buckets(
    conn: Connection, kinds: Sequence[str], since: float | None, until: float | None, step: int
) -> list[Sequence[Any]]:
    """(period start, kind, events) for ``kinds`` in the window, by ``step`` seconds."""
    e = events.c
    period = dialect_of(conn).bucket(e.at, step).label("period")
    stmt = (
        select(period, e.kind, func.count())
        .where(e.kind.in_(list(kinds)), *window(e.at, since, until))
        .group_by(period, e.kind)
        .order_by(period)
    )
    return list(conn.execute(stmt))


def report_event_totals_between(
    conn: Connection, kinds: Sequence[str], since: float | None, until: float | None
) -> dict[str, int]:
    """Events of each of ``kinds`` in the window (0 for a kind with none)."""
    e = events.c
    stmt = (
        select(e.kind, func.count())
        .where(e.kind.in_(list(kinds)), *window(e.at, since, until))
        .group_by(e.kind)
    )
    found = {str(k): int(n) for k, n in conn.execute(stmt)}
    return {k: found.get(k, 0) for k in kinds}


def report_event_details(
    conn: Connection, kind: str, since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(code, detail, events, latest) of one event kind in the window, most frequent first.

    The caller folds details that differ only in their variable part (a command echoed
    back, a retry delay) into one reason.
    """
    e = events.c
    n = func.count().label("n")
    stmt = (
        select(e.code, e.detail, n, func.max(e.at))
        .where(e.kind == kind, *window(e.at, since, until))
        .group_by(e.code, e.detail)
        .order_by(n.desc(), e.code, e.detail)
    )
    return list(conn.execute(stmt))


def report_bad_events(
    conn: Connection, since: float | None, until: float | None, limit: int
) -> list[Sequence[Any]]:
    """(at, queue_id, code, detail, sender or None) of failures in the window, latest first.

    From the envelope log, so mail that was requeued, deleted or purged since is listed.
    """
    e, m = events.c, messages.c
    stmt = (
        select(e.at, e.queue_id, e.code, e.detail, m.mail_from)
        .select_from(events.outerjoin(messages, m.queue_id == e.queue_id))
        .where(e.kind == "bad", *window(e.at, since, until))
        .order_by(e.at.desc(), e.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt))


def run_sql(conn: Connection, sql: str) -> tuple[list[str], Iterable[Sequence[Any]]]:
    """The operator's own statement, on a connection the caller made read-only.

    Returns the column names and the streamed rows (no names: it returns no rows).
    """
    # no_parameters: the text goes to the driver as it is, so a LIKE '%x%' is not
    # taken for a psycopg placeholder.
    result = conn.execution_options(stream_results=True, no_parameters=True).exec_driver_sql(sql)
    if not result.returns_rows:
        return [], iter(())
    return list(result.keys()), result


def tune_for_reports(conn: Connection) -> None:
    """Per-connection read tuning for big reports (see the dialects); never writes."""
    dialect_of(conn).tune_for_reports(conn)


def set_read_only(conn: Connection) -> None:
    """Make the current transaction read-only, by the database (SQLite report
    connections already are: ``mode=ro`` + ``query_only``)."""
    dialect_of(conn).read_only(conn)


def guard_operator_sql(conn: Connection) -> AbstractContextManager[None]:
    """Around the operator's own statement: the database refuses anything but reads."""
    return dialect_of(conn).guard_operator_sql(conn)
