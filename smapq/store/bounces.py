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

from sqlalchemy import Connection, bindparam, insert, select

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


class Notice:
    """One notice to queue: its message (from the null sender, to ``recipient``) and
    the event on the message it reports on (``about``: BOUNCED or WARNED, ``detail``)."""

    __slots__ = ("about", "body", "detail", "event", "queue_id", "recipient", "trace")

    def __init__(
        self,
        queue_id: str,
        recipient: str,
        trace: str,
        body: bytes,
        about: str,
        event: str,
        detail: str,
    ) -> None:
        self.queue_id = queue_id
        self.recipient = recipient
        self.trace = trace
        self.body = body
        self.about = about
        self.event = event
        self.detail = detail


# Built once with bind parameters, so SQLAlchemy reuses their compiled form; a group
# commit of many failures queues its notices in three executemany statements.
_STMTS: dict[str, Any] = {}

_MESSAGE_COLUMNS = ("queue_id", "size", "trace", "body", "body_sha256")


def _statements() -> tuple[Any, Any]:
    if not _STMTS:
        now: Any = bindparam("n_now")
        _STMTS["message"] = insert(messages).values(
            state=states.RECEIVED,
            received_at=now,
            protocol=PROTOCOL,
            mail_from="",
            next_attempt_at=now,
            updated_at=now,
            **{c: bindparam(f"n_{c}") for c in _MESSAGE_COLUMNS},
        )
        message_id = (
            select(messages.c.id)
            .where(messages.c.queue_id == bindparam("n_queue_id"))
            .scalar_subquery()
        )
        _STMTS["recipient"] = insert(recipients).values(
            message_id=message_id, position=0, address=bindparam("n_address")
        )
    return _STMTS["message"], _STMTS["recipient"]


def queue_notices(conn: Connection, now: float, notices: Sequence[Notice]) -> None:
    """Queue ``notices``: each a ``received`` message from the null sender, due now,
    with its one recipient, and the events on both messages."""
    if not notices:
        return
    message, recipient = _statements()
    conn.execute(
        message,
        [
            {
                "n_now": now,
                "n_queue_id": n.queue_id,
                "n_size": len(n.body),
                "n_trace": n.trace,
                "n_body": n.body,
                "n_body_sha256": sha256(n.body).hexdigest(),
            }
            for n in notices
        ],
    )
    rcpts = [{"n_queue_id": n.queue_id, "n_address": n.recipient} for n in notices]
    conn.execute(recipient, rcpts)
    logged = []
    for n in notices:
        what = "failure" if n.event == BOUNCED else "delay"
        logged += [
            {"at": now, "kind": n.event, "queue_id": n.about, "address": n.recipient,
             "detail": n.detail},
            {"at": now, "kind": DSN, "queue_id": n.queue_id, "address": n.recipient,
             "detail": f"{what} notice for {n.about}"},
        ]  # fmt: skip
    conn.execute(insert(events), logged)
