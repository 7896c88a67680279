"""The SQL of delivery status notifications: who failed, who was warned, the notice row.

Purpose: the deliverer queues a DSN (a bounce or a delay warning) as a new message in
the queue, inside the transaction that records the outcome it reports on
(smapq/deliver/notices.py). These are the statements it needs there: the recipients
still unsent (the per-recipient bookkeeping: ``sent_at`` is set when sendmail accepted
a batch), which messages were already warned (at most one warning each), and the
INSERTs of the notice with its events.

Transactions are the caller's; nothing here commits. SQLAlchemy Core on the one
MetaData, nothing dialect-specific: the same statements run on SQLite and PostgreSQL.

Events: ``bounced`` / ``warned`` on the original message (address: the sender told),
``dsn`` on the notice itself (where it came from), so ``smapq queue show`` of either
leads to the other and the reports count notices from the envelope log.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha256
from typing import Any

from sqlalchemy import Connection, insert, select

from smapq.store import states
from smapq.store.schema import events, messages, recipients

BOUNCED = "bounced"  # a failure notice was queued for the message's sender
WARNED = "warned"  # a delay warning was queued for the message's sender
DSN = "dsn"  # the notice's own first event: which message it reports on
PROTOCOL = "DSN"  # messages.protocol of a notice: made here, never received


def unsent_recipients(conn: Connection, message_ids: Sequence[int]) -> dict[int, list[str]]:
    """Per message, the address of every recipient sendmail has not accepted, in
    envelope order."""
    out: dict[int, list[str]] = {int(i): [] for i in message_ids}
    if not out:
        return out
    r = recipients.c
    stmt = (
        select(r.message_id, r.address)
        .where(r.message_id.in_(list(out)), r.sent_at.is_(None))
        .order_by(r.message_id, r.position)
    )
    for row in conn.execute(stmt):
        out[int(row.message_id)].append(str(row.address))
    return out


def warned(conn: Connection, queue_ids: Sequence[str]) -> set[str]:
    """The queue ids among ``queue_ids`` whose sender was already sent a delay warning.

    From the envelope log: the ``warned`` event is written in the transaction that
    queues the warning, and a waiting message's events are never pruned (retention
    keeps them), so the log is an exact record for every message that can still defer.
    """
    if not queue_ids:
        return set()
    e = events.c
    stmt = select(e.queue_id).where(e.kind == WARNED, e.queue_id.in_(list(queue_ids)))
    return {str(q) for (q,) in conn.execute(stmt)}


def queue_notice(
    conn: Connection,
    *,
    queue_id: str,
    now: float,
    recipient: str,
    trace: str,
    body: bytes,
    about: str,
    event: str,
    detail: str,
) -> int:
    """Queue one notice: a ``received`` message from the null sender to ``recipient``,
    due now, and its events; returns its messages.id.

    ``about`` is the queue id of the message reported on; ``event`` is BOUNCED or
    WARNED, recorded on it with ``detail``.
    """
    row: dict[str, Any] = {
        "queue_id": queue_id,
        "state": states.RECEIVED,
        "received_at": now,
        "protocol": PROTOCOL,
        "mail_from": "",
        "size": len(body),
        "trace": trace,
        "body": body,
        "body_sha256": sha256(body).hexdigest(),
        "next_attempt_at": now,
        "updated_at": now,
    }
    key = conn.execute(insert(messages).values(row)).inserted_primary_key
    assert key is not None
    message_id = int(key[0])
    conn.execute(insert(recipients).values(message_id=message_id, position=0, address=recipient))
    conn.execute(
        insert(events),
        [
            {"at": now, "kind": event, "queue_id": about, "address": recipient, "detail": detail},
            {
                "at": now,
                "kind": DSN,
                "queue_id": queue_id,
                "address": recipient,
                "detail": f"{'failure' if event == BOUNCED else 'delay'} notice for {about}",
            },
        ],
    )
    return message_id
