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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Insert,
    Integer,
    Row,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError

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


def insert_recipient_by_queue_id_stmt() -> Insert:
    """A recipient of a message inserted in the same transaction, found by its queue id
    (so a batch of messages needs no round trip for each new message's id)."""
    message_id = (
        select(messages.c.id).where(messages.c.queue_id == bindparam("queue_id")).scalar_subquery()
    )
    return insert(recipients).values(
        message_id=message_id,
        position=bindparam("position"),
        address=bindparam("address"),
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
# The inetd receiver cannot pay for SQLAlchemy: it runs these statements through stdlib
# sqlite3 as the strings in ``smapq/store/rendered.py``. ``receiver_sql()`` renders them
# (SQLite, named parameters); tests/receive/test_receive_rendered.py checks the file matches.

RECEIVER_STATEMENTS = {
    "INSERT_MESSAGE": insert_message_stmt,
    "INSERT_RECIPIENT_BY_QUEUE_ID": insert_recipient_by_queue_id_stmt,
    "INSERT_EVENT": insert_event_stmt,
}


def receiver_sql() -> dict[str, str]:
    """Name -> SQL text of every receiver statement, as ``rendered.py`` must hold it."""
    from sqlalchemy.dialects import sqlite  # noqa: PLC0415  (only the render step needs it)

    dialect = sqlite.dialect(paramstyle="named")
    return {
        name: str(build().compile(dialect=dialect)) for name, build in RECEIVER_STATEMENTS.items()
    }


# --- deliverer -----------------------------------------------------------------------
# Every statement smapq deliver runs. Transitions are fenced: they apply only
# ``WHERE lease_token = :token AND state = 'delivering'``, so a deliverer whose lease
# expired (and whose row may since have been claimed again) cannot overwrite it.

CLAIM_COLUMNS = (
    messages.c.id,
    messages.c.queue_id,
    messages.c.mail_from,
    messages.c.received_at,
    messages.c.next_attempt_at,
    messages.c.attempts,
    messages.c.lease_token,
    messages.c.trace,
    messages.c.body,
    messages.c.body_sha256,
)


def recover_expired_stmt(now: Any, keep_owner: Any = None) -> Any:
    """The recovery UPDATE with values (tests, plans); ``recover_expired`` runs the
    form built once with bind parameters."""
    stmt = (
        messages.update()
        .where(messages.c.state == states.DELIVERING)
        .where(messages.c.lease_expires_at < now)
    )
    if keep_owner is not None:
        stmt = stmt.where(func.coalesce(messages.c.lease_owner, "") != keep_owner)
    # Due at once (not at its old next_attempt_at): a ``--once`` run takes only what
    # was due when it began, so a row it recovers mid-run waits for the next run.
    return stmt.values(
        state=states.RECEIVED,
        attempts=messages.c.attempts + 1,
        lease_expires_at=None,
        next_attempt_at=now,
        updated_at=now,
    ).returning(messages.c.id, messages.c.queue_id, messages.c.lease_owner)


def _recover_expired_cached(skip_owner: bool) -> Any:
    key = "recover_skip" if skip_owner else "recover"
    stmt = _DELIVERER_STMTS.get(key)
    if stmt is None:
        owner: Any = bindparam("r_owner") if skip_owner else None
        stmt = _DELIVERER_STMTS[key] = recover_expired_stmt(bindparam("r_now"), owner)
    return stmt


def _recover_params(now: float, keep_owner: str | None) -> dict[str, Any]:
    return {"r_now": now} if keep_owner is None else {"r_now": now, "r_owner": keep_owner}


def recover_expired(conn: Connection, now: float, keep_owner: str | None = None) -> list[Row[Any]]:
    """Rows whose lease expired go back to ``received`` (due at once), one event each.

    The attempt is counted, so a message that kills its deliverer every time still
    ages out through maxqueuetime instead of looping forever. ``keep_owner`` (the
    calling deliverer) is skipped: a deliverer that was stopped past its leases still
    runs those sendmails; it renews its leases instead of re-claiming its own rows and
    starting a second sendmail beside the first. Others recover them if it is dead.
    """
    stmt = _recover_expired_cached(keep_owner is not None)
    rows = list(conn.execute(stmt, _recover_params(now, keep_owner)))
    if not rows:
        return rows
    insert_events(
        conn,
        [
            {
                "at": now,
                "kind": "recovered",
                "queue_id": r.queue_id,
                "detail": f"lease of {r.lease_owner} expired",
            }
            for r in rows
        ],
    )
    return rows


def claim_stmt(owner: Any, now: Any, lease: Any, limit: Any) -> Any:
    """The claim UPDATE with values (tests, plans); ``claim`` runs the form built once
    with bind parameters."""
    return _claim_build(owner, now, now + lease, limit, now)


def _claim_cached() -> Any:
    stmt = _DELIVERER_STMTS.get("claim")
    if stmt is None:
        stmt = _DELIVERER_STMTS["claim"] = _claim_build(
            bindparam("c_owner"),
            bindparam("c_now"),
            bindparam("c_expires"),
            bindparam("c_limit"),
            bindparam("c_due"),
        )
    return stmt


def _claim_build(owner: Any, now: Any, expires: Any, limit: Any, due_by: Any) -> Any:
    # The subquery's FOR UPDATE SKIP LOCKED makes concurrent PostgreSQL deliverers skip
    # each other's rows; SQLite drops it and serialises on BEGIN IMMEDIATE instead.
    due = (
        select(messages.c.id)
        .where(messages.c.state == states.RECEIVED)
        .where(messages.c.next_attempt_at <= due_by)
        .order_by(messages.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    # No outer ``state = 'received'``: the subquery already chose (and, on PostgreSQL,
    # locked and re-checked) received rows, and with that term SQLite's planner, lacking
    # ANALYZE statistics, walks every received row to test ``id IN (...)`` -- a claim
    # whose cost grows with the backlog. tests/deliver checks the plan uses the key.
    return (
        messages.update()
        .where(messages.c.id.in_(due))
        .values(
            state=states.DELIVERING,
            lease_owner=owner,
            lease_expires_at=expires,
            lease_token=messages.c.lease_token + 1,
            updated_at=now,
        )
        .returning(*CLAIM_COLUMNS)
    )


def _claim_params(
    owner: str, now: float, lease: float, limit: int, due_by: float | None = None
) -> dict[str, Any]:
    return {
        "c_owner": owner,
        "c_now": now,
        "c_expires": now + lease,
        "c_limit": limit,
        "c_due": now if due_by is None else min(now, due_by),
    }


def claim(
    conn: Connection,
    owner: str,
    now: float,
    lease: float,
    limit: int,
    due_by: float | None = None,
) -> list[Row[Any]]:
    """Claim up to ``limit`` due messages for ``owner``; oldest due first, one event each.

    ``due_by``: only messages due by then (``deliver --once`` passes its start time, so
    a message it defers is not taken again in the same run).
    """
    # RETURNING order is unspecified; hand messages out oldest-due first.
    rows = sorted(
        conn.execute(_claim_cached(), _claim_params(owner, now, lease, limit, due_by)),
        key=lambda r: (r[4], r[0]),  # (next_attempt_at, id): see CLAIM_COLUMNS
    )
    _claim_events(conn, owner, now, rows)
    return rows


def claim_one(
    conn: Connection,
    owner: str,
    message_id: int,
    now: float,
    lease: float,
    due_by: float | None = None,
) -> Row[Any] | None:
    """Claim one message by id if it is still due (the deliverer's careful mode, used
    once the database has shown damage: one row at a time, so one unreadable row
    fails alone)."""
    cutoff = now if due_by is None else min(now, due_by)
    stmt = (
        messages.update()
        .where(messages.c.id == message_id)
        .where(messages.c.state == states.RECEIVED)
        .where(messages.c.next_attempt_at <= cutoff)
        .values(
            state=states.DELIVERING,
            lease_owner=owner,
            lease_expires_at=now + lease,
            lease_token=messages.c.lease_token + 1,
            updated_at=now,
        )
        .returning(*CLAIM_COLUMNS)
    )
    row = conn.execute(stmt).first()
    if row is not None:
        _claim_events(conn, owner, now, [row])
    return row


def due_ids(conn: Connection, due_by: float, limit: int) -> list[int]:
    """Ids of due messages, oldest due first, from the due index alone (rows another
    deliverer holds locked are skipped, as the claim skips them)."""
    stmt = (
        select(messages.c.id)
        .where(messages.c.state == states.RECEIVED)
        .where(messages.c.next_attempt_at <= due_by)
        .order_by(messages.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [int(i) for i in conn.execute(stmt).scalars()]


def due_ids_between(conn: Connection, low: int, high: int, due_by: float) -> list[int]:
    """Ids of due messages with ``low <= id <= high``, walking the table itself (not the
    due index, which may be the damaged part): the careful mode's fallback."""
    stmt = (
        select(messages.c.id)
        .with_hint(messages, "NOT INDEXED", "sqlite")
        .where(messages.c.id.between(low, high))
        .where(messages.c.state == states.RECEIVED)
        .where(messages.c.next_attempt_at <= due_by)
        .order_by(messages.c.id)
    )
    return [int(i) for i in conn.execute(stmt).scalars()]


def id_bounds(conn: Connection) -> tuple[int, int]:
    """(lowest, highest) message id, (1, 0) for an empty queue."""
    low, high = conn.execute(select(func.min(messages.c.id), func.max(messages.c.id))).one()
    return (1, 0) if low is None else (int(low), int(high))


def _claim_events(conn: Connection, owner: str, now: float, rows: Sequence[Row[Any]]) -> None:
    insert_events(
        conn,
        [
            {
                "at": now,
                "kind": "claim",
                "queue_id": r.queue_id,
                "detail": f"{owner} token {r.lease_token}",
            }
            for r in rows
        ],
    )


def unsent_recipients(conn: Connection, message_ids: Sequence[int]) -> list[Row[Any]]:
    """Recipients not yet handed to sendmail, for the messages just claimed."""
    if not message_ids:
        return []
    stmt = _DELIVERER_STMTS.get("unsent")
    if stmt is None:
        stmt = _DELIVERER_STMTS["unsent"] = (
            select(recipients.c.id, recipients.c.message_id, recipients.c.address)
            .where(recipients.c.message_id.in_(bindparam("u_ids", expanding=True)))
            .where(recipients.c.sent_at.is_(None))
            .order_by(recipients.c.message_id, recipients.c.position)
        )
    return list(conn.execute(stmt, {"u_ids": list(message_ids)}))


def renew_leases(
    conn: Connection, owner: str, message_ids: Sequence[int], expires_at: float
) -> set[int]:
    """Extend the leases ``owner`` still holds; returns the ids actually renewed."""
    if not message_ids:
        return set()
    stmt = (
        messages.update()
        .where(messages.c.id.in_(message_ids))
        .where(messages.c.state == states.DELIVERING)
        .where(messages.c.lease_owner == owner)
        .values(lease_expires_at=expires_at)
        .returning(messages.c.id)
    )
    return {int(r.id) for r in conn.execute(stmt)}


# Statements the deliverer runs once or more per message are built once, with bind
# parameters, so SQLAlchemy reuses their cache key and compiled form.
_DELIVERER_STMTS: dict[str, Any] = {}


def _still_mine() -> Any:
    return (
        select(messages.c.id)
        .where(messages.c.id == bindparam("m_id"))
        .where(messages.c.lease_token == bindparam("m_token"))
        .where(messages.c.state == states.DELIVERING)
        .exists()
    )


def mark_sent_stmt() -> Any:
    stmt = _DELIVERER_STMTS.get("mark_sent")
    if stmt is None:
        stmt = _DELIVERER_STMTS["mark_sent"] = (
            recipients.update()
            .where(recipients.c.id.in_(bindparam("r_ids", expanding=True)))
            .where(recipients.c.sent_at.is_(None))
            .where(_still_mine())
            .values(sent_at=bindparam("r_now"), last_result=bindparam("r_result"))
        )
    return stmt


def mark_sent(
    conn: Connection,
    message_id: int,
    token: int,
    recipient_ids: Sequence[int],
    now: float,
    result: str,
) -> bool:
    """Record a batch sendmail accepted, so no retry sends it again; False if fenced off."""
    params = {
        "r_ids": list(recipient_ids),
        "r_now": now,
        "r_result": result,
        "m_id": message_id,
        "m_token": token,
    }
    return conn.execute(mark_sent_stmt(), params).rowcount > 0


FINISH_COLUMNS = ("state", "attempts", "next_attempt_at", "delivered_at")


def finish_stmt() -> Any:
    stmt = _DELIVERER_STMTS.get("finish")
    if stmt is None:
        stmt = _DELIVERER_STMTS["finish"] = (
            messages.update()
            .where(messages.c.id == bindparam("m_id"))
            .where(messages.c.lease_token == bindparam("m_token"))
            .where(messages.c.state == states.DELIVERING)
            .values(
                lease_owner=None,
                lease_expires_at=None,
                updated_at=bindparam("m_now"),
                last_exit=bindparam("m_exit"),
                last_result=bindparam("m_result"),
                **{c: bindparam(f"m_{c}") for c in FINISH_COLUMNS},
            )
        )
    return stmt


def _event_stmt() -> Any:
    stmt = _DELIVERER_STMTS.get("event")
    if stmt is None:
        stmt = _DELIVERER_STMTS["event"] = insert(events)
    return stmt


def held_leases(conn: Connection, leases: Sequence[tuple[int, int]]) -> set[int]:
    """Of (message id, lease token) pairs, the ids whose lease is still held (locks them)."""
    return {mid for mid, _ in _held_pairs(conn, leases)}


def _held_pairs(conn: Connection, leases: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    if not leases:
        return set()
    wanted = {(int(mid), int(token)) for mid, token in leases}
    stmt = _DELIVERER_STMTS.get("held")
    if stmt is None:
        stmt = _DELIVERER_STMTS["held"] = (
            select(messages.c.id, messages.c.lease_token)
            .where(messages.c.id.in_(bindparam("h_ids", expanding=True)))
            .where(messages.c.state == states.DELIVERING)
            .with_for_update()
        )
    rows = conn.execute(stmt, {"h_ids": sorted({mid for mid, _ in wanted})})
    return {(int(mid), int(token)) for mid, token in rows} & wanted


def _recipient_result_stmt(sent: bool) -> Any:
    key = "rcpt_sent" if sent else "rcpt_note"
    stmt = _DELIVERER_STMTS.get(key)
    if stmt is None:
        values: dict[str, Any] = {"last_result": bindparam("r_result")}
        if sent:
            values["sent_at"] = bindparam("r_now")
        stmt = _DELIVERER_STMTS[key] = (
            recipients.update().where(recipients.c.id == bindparam("r_id")).values(**values)
        )
    return stmt


def record_outcomes(
    conn: Connection,
    now: float,
    outcomes: Sequence[Mapping[str, Any]],
    sent: Sequence[tuple[int, int, int, str]] = (),
    notes: Sequence[tuple[int, int, int, str]] = (),
) -> set[tuple[int, int]]:
    """Several outcomes in the caller's one transaction (group commit).

    Returns the (message id, lease token) pairs whose lease was still held: only those
    are written (the rest belong to a newer claim now and are left alone, events
    included; the newer claim may be in the same batch). ``outcomes`` rows carry
    message_id, token, queue_id, event, code, detail and the ``FINISH_COLUMNS``;
    ``sent`` are (message id, token, recipient id, result) for batches sendmail
    accepted, ``notes`` the same for recipients that were not delivered.
    """
    held_pairs = _held_pairs(conn, [(o["message_id"], o["token"]) for o in outcomes])
    sent_rows = [
        {"r_id": rid, "r_now": now, "r_result": text}
        for mid, token, rid, text in sent
        if (mid, token) in held_pairs
    ]
    if sent_rows:
        conn.execute(_recipient_result_stmt(True), sent_rows)
    note_rows = [
        {"r_id": rid, "r_result": text}
        for mid, token, rid, text in notes
        if (mid, token) in held_pairs
    ]
    if note_rows:
        conn.execute(_recipient_result_stmt(False), note_rows)
    params = []
    logged = []
    for o in outcomes:
        if (int(o["message_id"]), int(o["token"])) not in held_pairs:
            continue
        p = {f"m_{c}": o[c] for c in FINISH_COLUMNS}
        p.update(
            m_id=o["message_id"],
            m_token=o["token"],
            m_now=now,
            m_exit=o["code"],
            m_result=o["detail"],
        )
        params.append(p)
        event = {"at": now, "kind": o["event"], "queue_id": o["queue_id"], "code": o["code"]}
        event["detail"] = o["detail"]
        logged.append({c: event.get(c) for c in EVENT_COLUMNS})
    if params:
        conn.execute(finish_stmt(), params)
        conn.execute(_event_stmt(), logged)
    return held_pairs


def release_owned(conn: Connection, owner: str, now: float, detail: str) -> list[Row[Any]]:
    """Every row ``owner`` still holds goes back to ``received``, the attempt not counted.

    The deliverer's last statement before it exits (its workers are gone, so none of
    these rows has a sendmail running): whatever it still holds is released at once
    instead of waiting out the lease (which would also count an attempt). Owner names
    are unique per process, so this touches only this deliverer's claims.
    """
    stmt = (
        messages.update()
        .where(messages.c.state == states.DELIVERING)
        .where(messages.c.lease_owner == owner)
        .values(
            state=states.RECEIVED,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(messages.c.id, messages.c.queue_id, messages.c.lease_token)
    )
    rows = list(conn.execute(stmt))
    insert_events(
        conn,
        [{"at": now, "kind": "recovered", "queue_id": r.queue_id, "detail": detail} for r in rows],
    )
    return rows


HOLD_EVENTS = ("held", "released", "requeued")


def held_seconds(conn: Connection, queue_ids: Sequence[str]) -> dict[str, float]:
    """Per queue id, the time spent in ``held`` so far (from the hold/release events).

    The queue verbs write ``held`` when a message is put on hold and ``released`` or
    ``requeued`` when it leaves hold, each in the transaction that moves the row, so
    the events are an exact record of the held intervals. Only consulted when a
    deferral is near the give-up deadline (rare), so no column is needed for it.
    """
    if not queue_ids:
        return {}
    stmt = (
        select(events.c.queue_id, events.c.kind, events.c.at)
        .where(events.c.queue_id.in_(list(queue_ids)))
        .where(events.c.kind.in_(HOLD_EVENTS))
        .order_by(events.c.queue_id, events.c.id)
    )
    total: dict[str, float] = dict.fromkeys(queue_ids, 0.0)
    since: dict[str, float] = {}
    for r in conn.execute(stmt):
        qid = str(r.queue_id)
        if r.kind == "held":
            since.setdefault(qid, float(r.at))
        elif qid in since:
            total[qid] += max(0.0, float(r.at) - since.pop(qid))
    return total


def next_due_at(conn: Connection) -> float | None:
    """When the next message falls due or the next lease expires (None: nothing waits)."""
    due = select(func.min(messages.c.next_attempt_at)).where(messages.c.state == states.RECEIVED)
    lease = select(func.min(messages.c.lease_expires_at)).where(
        messages.c.state == states.DELIVERING
    )
    times = [conn.execute(due).scalar(), conn.execute(lease).scalar()]
    present = [float(t) for t in times if t is not None]
    return min(present) if present else None


def deliverer_sync(conn: Connection) -> None:
    """SQLite: ``synchronous=NORMAL`` on the deliverer's own connection (not in a txn).

    Safe for the deliverer only: the receiver's insert was fsynced at its COMMIT (FULL)
    and WAL is one log, so a power loss can drop only the deliverer's later commits
    (claim, sent_at, outcome). Each rolls a message back to an earlier state, which
    means a re-delivery (at-least-once), never a lost message. It saves an fsync per
    outcome, which otherwise bounds throughput on slow disks.
    """
    if conn.dialect.name == "sqlite":
        conn.connection.dbapi_connection.execute("PRAGMA synchronous = NORMAL")  # type: ignore[union-attr]


def checkpoint(conn: Connection) -> bool:
    """SQLite: copy the WAL into the database now (PASSIVE: waits for nobody).

    Outside any transaction. Once every frame is copied, the next writer starts the
    WAL again from its beginning, reusing the space the file already holds instead of
    growing it -- what lets a nearly full spool keep taking outcomes. True when the
    whole WAL was copied (or there is no WAL: another backend).
    """
    if conn.dialect.name != "sqlite":
        return True
    raw = conn.connection.dbapi_connection
    assert raw is not None
    sql = "PRAGMA wal_checkpoint(PASSIVE)"
    dbapi = conn.dialect.loaded_dbapi
    try:
        busy, log, done = raw.execute(sql).fetchone()
    except dbapi.Error as exc:  # the driver's own error: wrap it as SQLAlchemy would
        raise DBAPIError.instance(sql, None, exc, dbapi.Error) from exc
    return not busy and log == done


def purge_events(conn: Connection, cutoff: float, limit: int) -> int:
    """Delete up to ``limit`` of the oldest events from before ``cutoff``; how many.

    Events of a message still waiting (received, delivering, held) are kept whatever
    their age: they are that message's history, which ``queue show`` and the hold
    accounting (``held_seconds``) read.
    """
    e, m = events.c, messages.c
    waiting = (
        select(m.id)
        .where(m.queue_id == e.queue_id, m.state.in_(states.WAITING))
        .correlate(events)
        .exists()
    )
    oldest = select(e.id).where(e.at < cutoff, ~waiting).order_by(e.at).limit(limit)
    return int(conn.execute(events.delete().where(e.id.in_(oldest))).rowcount)


def data_version(conn: Connection) -> int:
    """SQLite's change counter: differs between two calls iff another connection committed."""
    return int(conn.exec_driver_sql("PRAGMA data_version").scalar() or 0)


# --- reports and queue verbs ---------------------------------------------------------
#
# Read side (reports, metrics, queue list/show) takes a read-only connection; the verbs
# take a connection inside ``engine.begin()`` and append their event in the same
# transaction. Windows are half-open [since, until) on the report's natural clock.

REFUSAL_KINDS = ("reject", "vrfy", "expn", "timeout")


def _window(col: Any, since: float | None, until: float | None) -> list[Any]:
    conds = []
    if since is not None:
        conds.append(col >= since)
    if until is not None:
        conds.append(col < until)
    return conds


def report_state_totals(
    conn: Connection, since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(state, messages, bytes) of messages received in the window."""
    m = messages.c
    stmt = (
        select(m.state, func.count(), func.coalesce(func.sum(m.size), 0))
        .where(*_window(m.received_at, since, until))
        .group_by(m.state)
    )
    return list(conn.execute(stmt))


def report_deferred_count(conn: Connection) -> int:
    m = messages.c
    stmt = select(func.count()).where(m.state == states.RECEIVED, m.attempts > 0)
    return int(conn.execute(stmt).scalar_one())


def report_oldest_waiting(conn: Connection) -> float | None:
    """received_at of the oldest message not yet delivered or bad (held included)."""
    m = messages.c
    stmt = select(func.min(m.received_at)).where(m.state.in_(states.WAITING))
    value = conn.execute(stmt).scalar_one()
    return None if value is None else float(value)


def report_delivered_count(conn: Connection, since: float | None, until: float | None) -> int:
    m = messages.c
    stmt = select(func.count()).where(
        m.delivered_at.is_not(None), *_window(m.delivered_at, since, until)
    )
    return int(conn.execute(stmt).scalar_one())


def report_event_count(
    conn: Connection, kind: str, since: float | None, until: float | None
) -> int:
    e = events.c
    stmt = select(func.count()).where(e.kind == kind, *_window(e.at, since, until))
    return int(conn.execute(stmt).scalar_one())


def report_top_senders(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(sender, messages, bytes), most messages first."""
    m = messages.c
    n = func.count().label("n")
    stmt = (
        select(m.mail_from, n, func.sum(m.size))
        .where(*_window(m.received_at, since, until))
        .group_by(m.mail_from)
        .order_by(n.desc(), m.mail_from)
        .limit(top)
    )
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
_RCPT_TOP_INSIDE = """
SELECT r.address, count(*) AS n
FROM messages AS m {hint} {cross} recipients AS r ON r.message_id = m.id
WHERE m.received_at >= :since AND m.received_at < :until
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
    sqlite = conn.dialect.name == "sqlite"
    params = {
        "since": _NO_LOWER if since is None else since,
        "until": _NO_UPPER if until is None else until,
        "top": top,
    }
    r = recipients.c
    n = func.count().label("n")
    if since is None and until is None:
        stmt: Any = (
            select(r.address, n).group_by(r.address).order_by(n.desc(), r.address).limit(top)
        )
    else:
        m = messages.c
        inside, lo, hi = conn.execute(
            select(func.count(), func.min(m.id), func.max(m.id)).where(
                *_window(m.received_at, since, until)
            )
        ).one()
        everything = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        # Messages in the id range but not in the window (ids may have gaps: an upper
        # bound). Many of them (just after a big import-spool) favour the other plan.
        strays = 0 if not inside else int(hi) - int(lo) + 1 - int(inside)
        narrow = inside * 8 <= everything or strays > inside
        hints = {
            "hint": "INDEXED BY ix_messages_received_at",
            "id_hint": "INDEXED BY ix_messages_id_cover",
            "addr_hint": "INDEXED BY ix_recipients_address",
        }
        sql = _RCPT_TOP_INSIDE if narrow else _RCPT_TOP_BY_ID_RANGE
        params.update(lo=int(lo or 1), hi=int(hi or 0))
        if sqlite:
            stmt = text(sql.format(cross="CROSS JOIN", **hints))
        else:
            stmt = text(sql.format(cross="JOIN", **dict.fromkeys(hints, "")))
    ranked = [(str(a), int(c)) for a, c in conn.execute(stmt, params)]
    if not ranked:
        return []
    by_bytes = text(
        _RCPT_BYTES.format(
            cross="CROSS JOIN" if sqlite else "JOIN",
            hint="INDEXED BY ix_messages_id_cover" if sqlite else "",
        )
    ).bindparams(bindparam("addresses", expanding=True))
    found = conn.execute(by_bytes, {**params, "addresses": [a for a, _ in ranked]})
    sizes: dict[str, int] = {str(a): int(b or 0) for a, b in found}
    return [(a, cnt, sizes.get(a, 0)) for a, cnt in ranked]


def report_top_clients(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(client_addr, latest client_name, messages, bytes), most messages first."""
    m = messages.c
    n = func.count().label("n")
    stmt = (
        select(m.client_addr, n, func.sum(m.size))
        .where(*_window(m.received_at, since, until))
        .group_by(m.client_addr)
        .order_by(n.desc(), m.client_addr)
        .limit(top)
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
    n = func.count().label("n")
    stmt = (
        select(e.client_addr, n)
        .where(e.kind == "reject", e.client_addr.is_not(None), *_window(e.at, since, until))
        .group_by(e.client_addr)
        .order_by(n.desc(), e.client_addr)
        .limit(top)
    )
    return list(conn.execute(stmt))


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
            column == key, *_window(m.received_at, since, until)
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
            mail.c.kind == "mail",
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
    conds = [e.kind == "reject", col.in_(list(keys)), *_window(e.at, since, until)]
    if by == "sender":
        conds.append(_sender_stage(e))
    elif by == "recipient":
        conds.append(~_sender_stage(e))
    stmt = select(col, func.count()).where(*conds).group_by(col)
    return {str(k): int(v) for k, v in conn.execute(stmt)}


def report_top_refused_senders(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(sender, refusals), most first: senders refused in their own transactions."""
    e = events.c
    n = func.count().label("n")
    stmt = (
        select(e.address, n)
        .where(e.kind == "reject", e.address.is_not(None), *_window(e.at, since, until))
        .where(_sender_stage(e))
        .group_by(e.address)
        .order_by(n.desc(), e.address)
        .limit(top)
    )
    return list(conn.execute(stmt))


def report_sender_totals(
    conn: Connection, senders: Sequence[str], since: float | None, until: float | None
) -> list[Sequence[Any]]:
    """(sender, messages, bytes) for the given senders, from ix_messages_mail_from."""
    return [
        (sender, *_messages_and_bytes(conn, messages.c.mail_from, sender, since, until))
        for sender in senders
    ]


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
        .where(m.delivered_at.is_not(None), *_window(m.delivered_at, since, until))
        .order_by(m.delivered_at)
    )
    if conn.dialect.name != "sqlite":
        return conn.execution_options(stream_results=True).execute(stmt)
    compiled = stmt.compile(dialect=conn.dialect)
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    return _chunks(cursor.execute(str(compiled), params))


def _chunks(cursor: Any, size: int = 10_000) -> Iterator[Sequence[Any]]:
    try:
        while rows := cursor.fetchmany(size):
            yield from rows
    finally:
        cursor.close()


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
            *_window(m.received_at, since, until),
        )
    )
    return conn.execution_options(stream_results=True).execute(stmt)


def _rcpt_count() -> Any:
    r = recipients.c
    return (
        select(func.count())
        .where(r.message_id == messages.c.id)
        .correlate(messages)
        .scalar_subquery()
    )


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
            _rcpt_count(),
        )
        .where(m.state == states.RECEIVED, m.attempts > 0)
        .where(*_window(m.received_at, since, until))
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
            _rcpt_count(),
        )
        .where(m.state == states.BAD, *_window(m.updated_at, since, until))
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
    n = func.count().label("n")
    ranked = list(
        conn.execute(
            select(e.client_addr, n)
            .where(e.kind == "connect", *_window(e.at, since, until))
            .group_by(e.client_addr)
            .order_by(n.desc(), e.client_addr)
            .limit(top)
        )
    )
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
                *_window(e.at, since, until),
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
        .where(e.kind == "tls", e.code == TLS_DONE, *_window(e.at, since, until))
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
            .where(e.kind.in_(REFUSAL_KINDS), *_window(e.at, since, until))
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


def _bucket(conn: Connection, col: Any, step: int) -> Any:
    """Start of the ``step``-second period holding ``col`` (epoch seconds, positive)."""
    if conn.dialect.name == "postgresql":
        return func.floor(col / step) * step
    # SQLite's CAST truncates toward zero, which is floor for times after 1970.
    return cast(col / step, Integer) * step


def report_event_buckets(
    conn: Connection, kinds: Sequence[str], since: float | None, until: float | None, step: int
) -> list[Sequence[Any]]:
    """(period start, kind, events) for ``kinds`` in the window, by ``step`` seconds."""
    e = events.c
    period = _bucket(conn, e.at, step).label("period")
    stmt = (
        select(period, e.kind, func.count())
        .where(e.kind.in_(list(kinds)), *_window(e.at, since, until))
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
        .where(e.kind.in_(list(kinds)), *_window(e.at, since, until))
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
        .where(e.kind == kind, *_window(e.at, since, until))
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
        .where(e.kind == "bad", *_window(e.at, since, until))
        .order_by(e.at.desc(), e.id.desc())
        .limit(limit)
    )
    return list(conn.execute(stmt))


def run_sql(conn: Connection, sql: str) -> tuple[list[str], Iterable[Sequence[Any]]]:
    """The operator's own statement, on a connection the caller made read-only.

    Returns the column names and the streamed rows (no names: it returns no rows).
    """
    result = conn.execution_options(stream_results=True).exec_driver_sql(sql)
    if not result.returns_rows:
        return [], iter(())
    return list(result.keys()), result


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
        _rcpt_count(),
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
    stmt = stmt.where(*_window(m.received_at, received_after, received_before))
    stmt = stmt.order_by(m.id)
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
    return conn.execute(stmt).rowcount == 1


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


def purge_candidates(
    conn: Connection,
    state: str,
    cutoff: float,
    after: tuple[float, int],
    limit: int,
    with_body_only: bool = False,
) -> list[Row[Any]]:
    """(id, queue_id, has_body, final_at) of ``state`` messages final before cutoff.

    Delivered mail ages from delivered_at, bad mail from updated_at. Keyset-paged on
    (t, id) after ``after``, so a long purge walks the index once instead of rescanning
    rows it already emptied. (t is delivered_at for delivered mail, updated_at for bad.)
    """
    m = messages.c
    t = m.delivered_at if state == states.DELIVERED else m.updated_at
    last_t, last_id = after
    stmt = (
        select(m.id, m.queue_id, m.body.is_not(None).label("has_body"), t.label("final_at"))
        .where(m.state == state, t < cutoff)
        .where((t > last_t) | ((t == last_t) & (m.id > last_id)))
        .order_by(t, m.id)
        .limit(limit)
    )
    if with_body_only:
        stmt = stmt.where(m.body.is_not(None))
    return list(conn.execute(stmt))


# The purge writes re-check the state in the statement itself: on PostgreSQL (read
# committed) a requeue of a bad message can commit between purge_candidates and these
# writes, and a requeued message must never lose its body or its row.


def purge_bodies(conn: Connection, message_ids: Sequence[int], state: str) -> list[str]:
    """Drop the bodies of those messages still in ``state``; their queue ids.

    ``updated_at`` stays: for bad mail it is the time of failure, which the bad report
    shows and the next purge ages from (the 'purged' event records the drop).
    """
    m = messages.c
    stmt = (
        messages.update()
        .where(m.id.in_(list(message_ids)), m.state == state, m.body.is_not(None))
        .values(body=None)
        .returning(m.queue_id)
    )
    return [str(q) for q in conn.execute(stmt).scalars()]


def purge_rows(conn: Connection, message_ids: Sequence[int], state: str) -> list[str]:
    """Delete those messages still in ``state`` and their recipients; their queue ids."""
    m = messages.c
    gone = list(
        conn.execute(
            messages.delete()
            .where(m.id.in_(list(message_ids)), m.state == state)
            .returning(m.id, m.queue_id)
        )
    )
    if gone:
        ids = [int(r.id) for r in gone]
        conn.execute(recipients.delete().where(recipients.c.message_id.in_(ids)))
    return [str(r.queue_id) for r in gone]


def imported_keys(conn: Connection) -> set[str]:
    """The ``detail`` of every 'imported' event: 'file sha256=...' keys already done."""
    e = events.c
    stmt = select(e.detail).where(e.kind == "imported")
    return {str(d) for d in conn.execute(stmt).scalars() if d is not None}


def tune_for_reports(conn: Connection) -> None:
    """Per-connection read tuning on SQLite: 64 MiB page cache, temp b-trees in memory,
    256 MiB mmap. None of these writes the file; other backends are left alone."""
    if conn.dialect.name != "sqlite":
        return
    for pragma in ("cache_size = -65536", "temp_store = MEMORY", "mmap_size = 268435456"):
        conn.exec_driver_sql(f"PRAGMA {pragma}")


def set_read_only(conn: Connection) -> None:
    """Make the current transaction read-only where the backend has such a thing.

    SQLite connections for reports are already ``mode=ro`` + ``query_only``.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")


def message_timeline(conn: Connection, queue_id: str, session_id: str | None) -> list[Row[Any]]:
    """Events of one message and of the SMTP session that brought it, in order."""
    e = events.c
    cond = e.queue_id == queue_id
    if session_id:
        cond = cond | (e.session_id == session_id)
    return list(conn.execute(select(events).where(cond).order_by(e.at, e.id)))
