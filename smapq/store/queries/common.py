"""The statements every audience shares: queue a message, read one back, windows.

Purpose: the foundation of the store API (insert a message with its recipients and
events, look one up) and the small builders the other query modules share.
Transactions are the caller's: functions take a ``Connection`` inside
``engine.begin()`` so each state transition is one transaction with its event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, func, insert, select

from smapq.store import states
from smapq.store.dialects import dialect_of
from smapq.store.schema import events, messages, recipients

MESSAGE_COLUMNS = (
    "queue_id",
    "state",
    "received_at",
    "session_id",
    "client_addr",
    "client_port",
    "client_name",
    "helo",
    "protocol",
    "mail_from",
    "size",
    "trace",
    "body",
    "body_sha256",
    "next_attempt_at",
    "updated_at",
)
RECIPIENT_COLUMNS = ("message_id", "position", "address")
EVENT_COLUMNS = (
    "at",
    "kind",
    "session_id",
    "queue_id",
    "client_addr",
    "address",
    "code",
    "detail",
)


def insert_message(
    conn: Connection,
    message: Mapping[str, Any],
    rcpts: Sequence[str],
    log: Iterable[Mapping[str, Any]] = (),
) -> int:
    """Queue one message: its row, its recipients and its events; returns messages.id.

    ``message`` needs the envelope columns of ``MESSAGE_COLUMNS``; state defaults to
    received, due now.
    """
    now = time.time()
    row = {c: message.get(c) for c in MESSAGE_COLUMNS}
    row["state"] = message.get("state") or states.RECEIVED
    row["received_at"] = message.get("received_at") or now
    row["next_attempt_at"] = message.get("next_attempt_at") or row["received_at"]
    row["updated_at"] = now
    message_id = conn.execute(insert(messages).values(row)).inserted_primary_key
    assert message_id is not None
    mid = int(message_id[0])
    if rcpts:
        conn.execute(
            insert(recipients),
            [{"message_id": mid, "position": i, "address": a} for i, a in enumerate(rcpts)],
        )
    insert_events(conn, log)
    if row["state"] == states.RECEIVED:
        dialect_of(conn).notify(conn)
    return mid


def insert_events(conn: Connection, log: Iterable[Mapping[str, Any]]) -> None:
    rows = [{c: e.get(c) for c in EVENT_COLUMNS} for e in log]
    for r in rows:
        r["at"] = r["at"] or time.time()
    if rows:
        conn.execute(insert(events), rows)


def add_event(conn: Connection, kind: str, **fields: Any) -> None:
    insert_events(conn, [{"kind": kind, **fields}])


def message_by_queue_id(conn: Connection, queue_id: str) -> Row[Any] | None:
    return conn.execute(select(messages).where(messages.c.queue_id == queue_id)).first()


def recipients_of(conn: Connection, message_id: int) -> list[Row[Any]]:
    stmt = (
        select(recipients)
        .where(recipients.c.message_id == message_id)
        .order_by(recipients.c.position)
    )
    return list(conn.execute(stmt))


def events_of(conn: Connection, queue_id: str) -> list[Row[Any]]:
    stmt = select(events).where(events.c.queue_id == queue_id).order_by(events.c.id)
    return list(conn.execute(stmt))


def count_by_state(conn: Connection) -> dict[str, int]:
    stmt = select(messages.c.state, func.count()).group_by(messages.c.state)
    return {state: int(n) for state, n in conn.execute(stmt)}


def window(col: Any, since: float | None, until: float | None) -> list[Any]:
    """Conditions for the half-open window [since, until) on ``col`` (None: open)."""
    conds = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


def recipient_count() -> Any:
    """A message's recipient count, as a subquery correlated to ``messages``."""
    r = recipients.c
    return (
        select(func.count())
        .where(r.message_id == messages.c.id)
        .correlate(messages)
        .scalar_subquery()
    )
