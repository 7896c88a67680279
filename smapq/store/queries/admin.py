"""The queue verbs' statements: list, find, hold, release, requeue, delete, show.

Purpose: what ``smapq queue ...`` and ``import-spool`` run. Verbs take a connection
inside ``engine.begin()`` and append their event in the same transaction; a state
test sits in each UPDATE itself, so a deliverer's claim that committed between our
read and our write wins and the verb reports the row unchanged. A verb that makes
mail due tells the deliverers (``NOTIFY`` on PostgreSQL) in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Row, func, or_, select

from smapq.store import states
from smapq.store.dialects import dialect_of
from smapq.store.queries.common import recipient_count, window
from smapq.store.schema import events, messages, recipients

DEFERRED = "deferred"  # not a state: received mail that was tried before


def queue_list(
    conn: Connection,
    *,
    queue_states: Sequence[str] = (),
    sender: str | None = None,
    recipient: str | None = None,
    client: str | None = None,
    received_before: float | None = None,
    received_after: float | None = None,
    after_id: int = 0,
    limit: int | None = None,
) -> Iterable[Sequence[Any]]:
    """Messages in queue order (messages.id), keyset-paged after ``after_id``, streamed.

    Rows: id, queue_id, state, received_at, size, attempts, mail_from, client_addr,
    recipient count, first recipient, next_attempt_at, last_result. ``queue_states``
    may name ``deferred`` (received and tried before). ``sender``, ``recipient`` and
    ``client`` are SQL LIKE patterns (the caller maps ``*`` to ``%``); a pattern
    without wildcards is an exact match.
    """
    m, r = messages.c, recipients.c
    first_rcpt = (
        select(r.address)
        .where(r.message_id == m.id)
        .order_by(r.position)
        .limit(1)
        .correlate(messages)
        .scalar_subquery()
    )
    stmt = select(
        m.id,
        m.queue_id,
        m.state,
        m.received_at,
        m.size,
        m.attempts,
        m.mail_from,
        m.client_addr,
        recipient_count(),
        first_rcpt,
        m.next_attempt_at,
        m.last_result,
    ).where(m.id > after_id)
    if queue_states:
        real = [s for s in queue_states if s != DEFERRED]
        conds: list[Any] = [m.state.in_(real)]
        if DEFERRED in queue_states and states.RECEIVED not in real:
            conds.append((m.state == states.RECEIVED) & (m.attempts > 0))
        stmt = stmt.where(or_(*conds))
    if sender is not None:
        stmt = stmt.where(m.mail_from.like(sender, escape="\\"))
    if client is not None:
        stmt = stmt.where(m.client_addr.like(client, escape="\\"))
    if recipient is not None:
        has = (
            select(r.id)
            .where(r.message_id == m.id, r.address.like(recipient, escape="\\"))
            .correlate(messages)
            .exists()
        )
        stmt = stmt.where(has)
    stmt = stmt.where(*window(m.received_at, received_after, received_before))
    waiting_only = bool(queue_states) and set(queue_states) <= {*states.WAITING, DEFERRED}
    # Waiting mail is a small set at the end of the id order: let the planner find it
    # by state and sort it rather than walk the primary key through delivered mail.
    order = dialect_of(conn).unordered(m.id) if waiting_only else m.id
    stmt = stmt.order_by(order)
    if limit is not None:
        stmt = stmt.limit(limit)
    return conn.execution_options(stream_results=True).execute(stmt)


def queue_list_recipients(
    conn: Connection, message_ids: Sequence[int]
) -> dict[int, list[tuple[str, float | None]]]:
    """message id -> [(address, sent_at)] in envelope order, for one page of a listing."""
    r = recipients.c
    out: dict[int, list[tuple[str, float | None]]] = {}
    for i in range(0, len(message_ids), 500):
        stmt = (
            select(r.message_id, r.address, r.sent_at)
            .where(r.message_id.in_(list(message_ids[i : i + 500])))
            .order_by(r.message_id, r.position)
        )
        for mid, address, sent_at in conn.execute(stmt):
            out.setdefault(int(mid), []).append((str(address), sent_at))
    return out


def queue_find(conn: Connection, queue_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """queue_id -> (id, queue_id, state, lease_expires_at, attempts) for the known ids."""
    m = messages.c
    found: dict[str, Row[Any]] = {}
    ids = list(dict.fromkeys(queue_ids))
    for i in range(0, len(ids), 500):
        stmt = select(m.id, m.queue_id, m.state, m.lease_expires_at, m.attempts).where(
            m.queue_id.in_(ids[i : i + 500])
        )
        found.update({row.queue_id: row for row in conn.execute(stmt)})
    return found


def queue_ids_in_state(conn: Connection, state: str) -> list[str]:
    m = messages.c
    stmt = select(m.queue_id).where(m.state == state).order_by(m.id)
    return [str(q) for q in conn.execute(stmt).scalars()]


def queue_transition(
    conn: Connection,
    message_id: int,
    from_states: Sequence[str],
    to_state: str,
    now: float,
    due_now: bool,
) -> bool:
    """Move one message between states if it is still in one of ``from_states``.

    The state test is in the UPDATE itself, so a deliverer's claim that committed
    between our read and this write wins and we report the row unchanged.
    """
    m = messages.c
    values: dict[str, Any] = {"state": to_state, "updated_at": now}
    if due_now:
        values.update(next_attempt_at=now, lease_owner=None, lease_expires_at=None)
    stmt = (
        messages.update().where(m.id == message_id, m.state.in_(list(from_states))).values(values)
    )
    moved = conn.execute(stmt).rowcount == 1
    if moved and to_state == states.RECEIVED:
        dialect_of(conn).notify(conn)
    return moved


def queue_delete(conn: Connection, message_id: int, now: float) -> bool:
    """Delete one message and its recipients unless a deliverer holds a live lease."""
    m = messages.c
    live = (m.state == states.DELIVERING) & (func.coalesce(m.lease_expires_at, 0) >= now)
    gone = conn.execute(messages.delete().where(m.id == message_id, ~live)).rowcount
    if gone:
        conn.execute(recipients.delete().where(recipients.c.message_id == message_id))
    return gone == 1


def message_body(conn: Connection, message_id: int) -> tuple[str, bytes | None] | None:
    """(trace, body) of one message; body is None once purged."""
    m = messages.c
    row = conn.execute(select(m.trace, m.body).where(m.id == message_id)).first()
    return None if row is None else (str(row[0]), row[1])


def imported_keys(conn: Connection) -> set[str]:
    """The ``detail`` of every 'imported' event: 'file sha256=...' keys already done."""
    e = events.c
    stmt = select(e.detail).where(e.kind == "imported")
    return {str(d) for d in conn.execute(stmt).scalars() if d is not None}


def message_timeline(conn: Connection, queue_id: str, session_id: str | None) -> list[Row[Any]]:
    """Events of one message and of the SMTP session that brought it, in order."""
    e = events.c
    cond = e.queue_id == queue_id
    if session_id:
        cond = cond | (e.session_id == session_id)
    return list(conn.execute(select(events).where(cond).order_by(e.at, e.id)))
