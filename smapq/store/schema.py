"""The one MetaData: messages, recipients and the append-only envelope log (events).

Purpose: the schema alembic migrates and every query in ``smapq.store.queries`` is built from.

Design: timestamps are ``float`` epoch seconds (UTC) so arithmetic (latency, age
buckets, hour buckets) is the same SQL on SQLite and PostgreSQL. ``events`` keeps the
queue id as text and no foreign key, so the audit trail outlives purged messages.
Indexes: ``ix_messages_due`` serves the claim query (state, next_attempt_at);
``ix_messages_lease`` finds expired leases; the rest serve reports.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from smapq.store import states

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Row ids: 64-bit on PostgreSQL (events outgrow 2**31 at a busy site); on SQLite
# INTEGER, which is 64-bit already and what makes the column the rowid.
ID = BigInteger().with_variant(Integer(), "sqlite")

_STATE_LIST = ", ".join(f"'{s}'" for s in states.STATES)

messages = Table(
    "messages",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("queue_id", String(32), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("session_id", String(32), nullable=True),
    Column("client_addr", String(64), nullable=True),
    Column("client_port", Integer, nullable=True),
    Column("client_name", String(255), nullable=True),
    Column("helo", String(255), nullable=True),
    Column("protocol", String(16), nullable=False),
    Column("mail_from", String(320), nullable=False),
    Column("size", Integer, nullable=False),
    Column("trace", Text, nullable=False),
    Column("body", LargeBinary, nullable=True),
    Column("body_sha256", String(64), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("lease_token", Integer, nullable=False, server_default="0"),
    Column("last_exit", Integer, nullable=True),
    Column("last_result", Text, nullable=True),
    Column("delivered_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    CheckConstraint(f"state IN ({_STATE_LIST})", name="state"),
    CheckConstraint("attempts >= 0", name="attempts"),
)
Index("ix_messages_due", messages.c.state, messages.c.next_attempt_at)
Index("ix_messages_lease", messages.c.state, messages.c.lease_expires_at)
Index("ix_messages_received_at", messages.c.received_at, messages.c.size)
# Report indexes are covering (see docs/reports.md): a lookup into the table itself
# would read the inline body, which is what made per-row lookups slow.
Index("ix_messages_mail_from", messages.c.mail_from, messages.c.received_at, messages.c.size)
Index("ix_messages_client_addr", messages.c.client_addr, messages.c.received_at, messages.c.size)
Index("ix_messages_delivered_at", messages.c.delivered_at, messages.c.received_at)
Index("ix_messages_state_received", messages.c.state, messages.c.received_at, messages.c.size)
# Keyed by id: joins from recipients read (received_at, size) from this small index
# instead of the table rows that carry the bodies.
Index("ix_messages_id_cover", messages.c.id, messages.c.received_at, messages.c.size)

recipients = Table(
    "recipients",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column(
        "message_id",
        ID,
        ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("position", Integer, nullable=False),
    Column("address", String(320), nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("last_result", Text, nullable=True),
)
Index("ix_recipients_message_id", recipients.c.message_id, recipients.c.position, unique=True)
Index("ix_recipients_address", recipients.c.address, recipients.c.message_id)

events = Table(
    "events",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("session_id", String(32), nullable=True),
    Column("queue_id", String(32), nullable=True),
    Column("client_addr", String(64), nullable=True),
    Column("address", String(320), nullable=True),
    Column("code", Integer, nullable=True),
    Column("detail", Text, nullable=True),
)
Index("ix_events_at", events.c.at)
Index("ix_events_kind_at", events.c.kind, events.c.at)
Index("ix_events_queue_id", events.c.queue_id)
Index("ix_events_kind_client", events.c.kind, events.c.client_addr, events.c.at, events.c.code)
Index("ix_events_session_id", events.c.session_id)
# Partial (migration 0002): the refusal counts of the senders and recipients reports.
# A query names the kind as a literal so that a planner may use them; the constant
# ``kind`` at the end of ix_events_mail is what makes SQLite's planner pick it.
_REJECT = text("kind = 'reject'")
_MAIL = text("kind = 'mail'")
Index(
    "ix_events_reject",
    events.c.address,
    events.c.at,
    events.c.session_id,
    sqlite_where=_REJECT,
    postgresql_where=_REJECT,
)
Index(
    "ix_events_mail",
    events.c.session_id,
    events.c.address,
    events.c.kind,
    sqlite_where=_MAIL,
    postgresql_where=_MAIL,
)
