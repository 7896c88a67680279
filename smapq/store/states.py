"""Message states and the crash-safety argument.

A message is *queued* when the receiver's single transaction (messages row + its
recipients + the audit events) has COMMITted with ``synchronous=FULL`` in WAL mode (on
PostgreSQL: ``synchronous_commit=on``). Only then does the client see ``250``. Before
that commit nothing of the message exists in the database: a dropped connection, a
timeout or a crash leaves no row, and a later error in the same session never touches
a committed row.

Transitions, each atomic with its event: one transaction, or one fenced statement in a
transaction the deliverer shares between outcomes that finish together (group commit):

    received --claim--> delivering --outcome--> delivered | received (deferred) | bad
    delivering --lease expired (checked on every claim poll)--> received
    received <--hold/release--> held        (held rows are never claimed, never expire)

A sender notice (``smapd: bounce on``: a bounce, a delay warning) is a new ``received``
row from the null sender, inserted in the transaction of the outcome it reports: the
message turns bad with its bounce queued, or neither happens.

A claim sets ``lease_owner``, ``lease_expires_at`` and a new ``lease_token`` (a fencing
token). Renewals and outcomes only apply ``WHERE lease_token = :token``, so a deliverer
whose lease expired and whose row was claimed again cannot overwrite the newer claim.

Consequence, stated honestly: delivery is at-least-once. A crash after sendmail
succeeded but before the outcome commit hands the message out again when the lease
expires. Per-recipient ``sent_at`` is committed after each successful sendmail batch,
so a retry only re-sends the batch that was in flight. Never at-most-once; never lost.

Durability: the receiver's commit uses ``synchronous=FULL``; the deliverer's own
connection uses NORMAL, so a power loss can roll back only deliverer transitions (claim,
outcome), which means a redelivery, never a lost message.
"""

from __future__ import annotations

RECEIVED = "received"
DELIVERING = "delivering"
DELIVERED = "delivered"
BAD = "bad"
HELD = "held"

STATES = (RECEIVED, DELIVERING, DELIVERED, BAD, HELD)
WAITING = (RECEIVED, DELIVERING, HELD)
