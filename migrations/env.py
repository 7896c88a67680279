"""Alembic environment: migrate the queue database named by the caller.

``smapq db upgrade`` passes an open connection in ``config.attributes["connection"]``;
plain ``alembic -c alembic.ini`` uses ``sqlalchemy.url``. ``render_as_batch`` lets
SQLite alter tables by copy-and-move.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from smapq.store.engine import make_engine
from smapq.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        render_as_batch=True,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url") or ""
    engine = make_engine(url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
