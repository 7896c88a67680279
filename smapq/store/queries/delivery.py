"""The deliverer's statements: claims, leases, outcomes, recovery, retention.

Purpose: every statement ``smapq deliver`` runs. Transitions are fenced: they apply
only ``WHERE lease_token = :token AND state = 'delivering'``, so a deliverer whose
lease expired (and whose row may since have been claimed again) cannot overwrite it.

Concurrency: the claim is one ``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
LOCKED) RETURNING``; on PostgreSQL concurrent deliverers skip each other's rows, on
SQLite the clause is dropped and ``BEGIN IMMEDIATE`` plus the queue's write lock
serialise them. Statements run once or more per message are built once, with bind
parameters (``functools.cache``), so SQLAlchemy reuses their compiled form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from sqlalchemy import Connection, Float, Row, String, bindparam, func, insert, literal, select

from smapq.store import states
from smapq.store.dialects import dialect_of
from smapq.store.queries.common import EVENT_COLUMNS, insert_events
from smapq.store.schema import events, messages, recipients

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


@cache
def _recover_expired_cached(skip_owner: bool) -> Any:
    owner: Any = bindparam("r_owner") if skip_owner else None
    return recover_expired_stmt(bindparam("r_now"), owner)


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


@cache
def _claim_cached() -> Any:
    return _claim_build(
        bindparam("c_owner"),
        bindparam("c_now"),
        bindparam("c_expires"),
        bindparam("c_limit"),
        bindparam("c_due"),
    )


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


@cache
def _claim_logged_cached() -> Any:
    """The claim and its 'claim' events in one statement (``writing_ctes``): the
    claim's transaction makes one round trip fewer, and its latency is mostly round
    trips when deliverers contend (bench/scale.py). The events are those
    ``_claim_events`` writes."""
    claimed = _claim_cached().cte("claimed")
    detail = func.concat(bindparam("c_owner", type_=String), " token ", claimed.c.lease_token)
    logged = insert(events).from_select(
        ["at", "kind", "queue_id", "detail"],
        select(
            bindparam("c_now", type_=Float),
            literal("claim", String),
            claimed.c.queue_id,
            detail,
        ),
    )
    return select(*claimed.c).add_cte(logged.cte("logged"))


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
    params = _claim_params(owner, now, lease, limit, due_by)
    logged = dialect_of(conn).writing_ctes
    stmt = _claim_logged_cached() if logged else _claim_cached()
    # RETURNING order is unspecified; hand messages out oldest-due first.
    rows = sorted(
        conn.execute(stmt, params),
        key=lambda r: (r[4], r[0]),  # (next_attempt_at, id): see CLAIM_COLUMNS
    )
    if not logged:
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


def ghost_ids(conn: Connection, due_by: float, limit: int) -> list[int]:
    """After a claim that took fewer than it had room for, in the same transaction:
    due ids it could not take -- rows the due index names but the table does not give
    (damage that raises no error).

    Only where nothing can commit between the claim and this read (SQLite); on
    PostgreSQL a message received in between would look like such a ghost, so none
    are reported (its damage shows as errors: XX001/XX002).
    """
    if not dialect_of(conn).stable_writes:
        return []
    return due_ids(conn, due_by, limit)


def due_ids_between(conn: Connection, low: int, high: int, due_by: float) -> list[int]:
    """Ids of due messages with ``low <= id <= high``, walking the table itself (not the
    due index, which may be the damaged part): the careful mode's fallback."""
    stmt = dialect_of(conn).table_scan(select(messages.c.id), messages)
    stmt = (
        stmt.where(messages.c.id.between(low, high))
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
    return list(conn.execute(_unsent_stmt(), {"u_ids": list(message_ids)}))


@cache
def _unsent_stmt() -> Any:
    return (
        select(recipients.c.id, recipients.c.message_id, recipients.c.address)
        .where(recipients.c.message_id.in_(bindparam("u_ids", expanding=True)))
        .where(recipients.c.sent_at.is_(None))
        .order_by(recipients.c.message_id, recipients.c.position)
    )


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


def _still_mine() -> Any:
    return (
        select(messages.c.id)
        .where(messages.c.id == bindparam("m_id"))
        .where(messages.c.lease_token == bindparam("m_token"))
        .where(messages.c.state == states.DELIVERING)
        .exists()
    )


@cache
def mark_sent_stmt() -> Any:
    return (
        recipients.update()
        .where(recipients.c.id.in_(bindparam("r_ids", expanding=True)))
        .where(recipients.c.sent_at.is_(None))
        .where(_still_mine())
        .values(sent_at=bindparam("r_now"), last_result=bindparam("r_result"))
    )


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


@cache
def finish_stmt() -> Any:
    return (
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


@cache
def _event_stmt() -> Any:
    return insert(events)


def held_leases(conn: Connection, leases: Sequence[tuple[int, int]]) -> set[int]:
    """Of (message id, lease token) pairs, the ids whose lease is still held (locks them)."""
    return {mid for mid, _ in _held_pairs(conn, leases)}


def _held_pairs(conn: Connection, leases: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
    if not leases:
        return set()
    wanted = {(int(mid), int(token)) for mid, token in leases}
    rows = conn.execute(_held_stmt(), {"h_ids": sorted({mid for mid, _ in wanted})})
    return {(int(mid), int(token)) for mid, token in rows} & wanted


@cache
def _held_stmt() -> Any:
    # FOR UPDATE: on PostgreSQL the rows stay ours until the outcome commits, so a
    # recovery or claim by another deliverer waits instead of interleaving.
    return (
        select(messages.c.id, messages.c.lease_token)
        .where(messages.c.id.in_(bindparam("h_ids", expanding=True)))
        .where(messages.c.state == states.DELIVERING)
        .with_for_update()
    )


@cache
def _recipient_result_stmt(sent: bool) -> Any:
    values: dict[str, Any] = {"last_result": bindparam("r_result")}
    if sent:
        values["sent_at"] = bindparam("r_now")
    return recipients.update().where(recipients.c.id == bindparam("r_id")).values(**values)


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
    if rows:  # due again now: other deliverers may take them
        dialect_of(conn).notify(conn)
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
    """The deliverer's own connection settings (not in a txn); see the dialects."""
    dialect_of(conn).deliverer_session(conn)


def checkpoint(conn: Connection) -> bool:
    """Outside any transaction: fold SQLite's WAL back (True when all of it was); a
    no-op elsewhere."""
    return dialect_of(conn).checkpoint(conn)


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
    """SQLite's change counter: differs between two calls iff another connection
    committed (0 on PostgreSQL, whose deliverers LISTEN instead)."""
    return dialect_of(conn).data_version(conn)


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
