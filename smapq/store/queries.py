"""Every SQL statement smapq runs, each a named function.

Purpose: the one place for SQL (procrastinate's ``queries.sql`` idea, in SQLAlchemy
Core so the same statements compile for SQLite and PostgreSQL). Nothing else in smapq
builds DML or SELECTs. The lean receiver cannot import SQLAlchemy; its statements are
rendered from the ``*_stmt`` builders below into ``rendered.py`` and a test checks the
two agree.

Transactions are the caller's: functions take a ``Connection`` inside
``engine.begin()`` so each state transition is one transaction with its event.

Sections: foundation (store API), receiver, deliverer, reports/queue verbs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Insert, Row, func, insert, select

from smapq.store import states
from smapq.store.schema import events, messages, recipients

# --- foundation: store API ---------------------------------------------------------

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


def insert_message_stmt() -> Insert:
    return insert(messages).values(dict.fromkeys(MESSAGE_COLUMNS))


def insert_recipient_stmt() -> Insert:
    return insert(recipients).values(dict.fromkeys(RECIPIENT_COLUMNS))


def insert_event_stmt() -> Insert:
    return insert(events).values(dict.fromkeys(EVENT_COLUMNS))


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


# --- receiver ------------------------------------------------------------------------


# --- deliverer -----------------------------------------------------------------------


# --- reports and queue verbs ---------------------------------------------------------
