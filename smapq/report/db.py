"""Opening the queue for reports and verbs, and database errors as one line.

Purpose: every command here turns a SQLAlchemy/DBAPI error (missing file, locked
database, no such table, a syntax error in ``report sql``) into ``SmapqError`` with the
driver's first line, so the CLI prints ``smapq: <what>: <reason>`` and exits non-zero
instead of a traceback. ``readonly_session`` adds the SQLite pragmas that make large
reports fast (a bigger page cache, memory temp store, mmap) -- all per-connection,
none of them writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from smapq.errors import SmapqError, UsageError
from smapq.store import queries


def _reason(exc: SQLAlchemyError) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@contextmanager
def translated(what: str, usage: bool = False) -> Iterator[None]:
    """Re-raise database errors as one-line ``SmapqError`` (``UsageError`` if usage)."""
    try:
        yield
    except DBAPIError as exc:
        cls = UsageError if usage else SmapqError
        raise cls(f"{what}: {_reason(exc)}") from None
    except SQLAlchemyError as exc:
        raise SmapqError(f"{what}: {_reason(exc)}") from None


@contextmanager
def readonly_session(engine: Engine) -> Iterator[Connection]:
    """A read-only connection (the engine must be made with readonly=True), tuned."""
    with translated("queue database"), engine.connect() as conn:
        queries.tune_for_reports(conn)
        yield conn
