"""partial indexes for the refusal counts of the senders and recipients reports

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 07:00:00.000000

``ix_events_reject`` holds only reject events, keyed by the address they named;
``ix_events_mail`` only MAIL events, keyed by session. Together they answer "was this
refusal of the session's own sender?" from two small indexes: on PostgreSQL the same
questions read every heap page of ``events`` (the rejects are spread through it) and
probed a session's rows one by one (0.5-0.7 s each at 1M messages, 72,000 rejects).

``ix_events_mail`` ends in ``kind`` (constant in it) for SQLite's planner: without it,
and without ANALYZE statistics, SQLite probed ``ix_events_kind_at`` -- every MAIL
event -- once per reject.

Cost per insert: a reject event adds one entry to ``ix_events_reject``; a MAIL event
(one per transaction) one to ``ix_events_mail`` -- about one more index entry per
message on top of the ~60 its rows already make (10 for the message, 3 per recipient,
6 per event); every other event only has the predicate checked. At the bench's 1M messages (72,000 rejects) they take 6 MB and
71 MB on PostgreSQL, and built in ~5 s. Both backends have partial indexes (SQLite
since 3.8.0).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REJECT = sa.text("kind = 'reject'")
MAIL = sa.text("kind = 'mail'")


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_events_reject",
            ["address", "at", "session_id"],
            unique=False,
            sqlite_where=REJECT,
            postgresql_where=REJECT,
        )
        batch_op.create_index(
            "ix_events_mail",
            ["session_id", "address", "kind"],
            unique=False,
            sqlite_where=MAIL,
            postgresql_where=MAIL,
        )


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_mail")
        batch_op.drop_index("ix_events_reject")
