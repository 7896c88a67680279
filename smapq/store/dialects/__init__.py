"""The dialect of a connection: ``dialect_of(conn)``; see ``base.Dialect``."""

from __future__ import annotations

from sqlalchemy import Connection

from smapq.store.dialects.base import Dialect
from smapq.store.dialects.postgresql import POSTGRESQL
from smapq.store.dialects.sqlite import SQLITE

_BY_NAME: dict[str, Dialect] = {SQLITE.name: SQLITE, POSTGRESQL.name: POSTGRESQL}


def named(name: str) -> Dialect:
    """The dialect called ``name`` (SQLAlchemy's dialect name)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        from smapq.errors import SmapqError  # noqa: PLC0415

        raise SmapqError(f"unsupported database engine {name!r}: sqlite or postgresql") from None


def dialect_of(conn: Connection) -> Dialect:
    return named(conn.dialect.name)


def for_database(database: str) -> Dialect:
    """The dialect of a ``database`` setting: a file path (SQLite) or a URL."""
    if "://" not in database:
        return SQLITE
    scheme = database.split("://", 1)[0].split("+", 1)[0]
    return named("postgresql" if scheme in ("postgres", "postgresql") else scheme)
