"""The intake's statements: a message, its recipients, its events, in one batch.

Purpose: the receivers cannot pay for SQLAlchemy on every connection (the inetd
receiver) or want plain driver calls in their writer (serve), so they run these
statements as SQL text. ``receiver_sql(dialect)`` renders them from the one schema:
``"sqlite"`` gives the strings in ``smapq/store/rendered.py`` (named parameters;
``python -m smapq.store.render`` writes that file, ``--check`` compares it, and
tests/receive/test_receive_rendered.py fails when they differ); ``"postgresql"`` gives
psycopg's ``%(name)s`` form for the PostgreSQL intake backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Insert, bindparam, insert, select

from smapq.store.queries.common import EVENT_COLUMNS, MESSAGE_COLUMNS, RECIPIENT_COLUMNS
from smapq.store.schema import events, messages, recipients


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


RECEIVER_STATEMENTS: dict[str, Callable[[], Insert]] = {
    "INSERT_MESSAGE": insert_message_stmt,
    "INSERT_RECIPIENT_BY_QUEUE_ID": insert_recipient_by_queue_id_stmt,
    "INSERT_EVENT": insert_event_stmt,
}


def receiver_sql(dialect: str = "sqlite") -> dict[str, str]:
    """Name -> SQL text of every receiver statement for ``dialect``'s driver.

    ``sqlite``: stdlib sqlite3, named parameters (what ``rendered.py`` must hold);
    ``postgresql``: psycopg, ``%(name)s`` parameters.
    """
    # Only the render step (and the PostgreSQL intake's start-up) needs the compilers.
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite  # noqa: PLC0415

        compiler: Any = sqlite.dialect(paramstyle="named")
    elif dialect == "postgresql":
        from sqlalchemy.dialects import postgresql  # noqa: PLC0415

        compiler = postgresql.dialect(paramstyle="pyformat")  # type: ignore[no-untyped-call]
    else:
        raise ValueError(f"no receiver SQL for {dialect!r}")
    return {
        name: str(build().compile(dialect=compiler)) for name, build in RECEIVER_STATEMENTS.items()
    }
