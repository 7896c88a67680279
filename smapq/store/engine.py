"""SQLAlchemy engines for the queue database: one setting, either engine.

Purpose: one place that knows how to open the queue. ``database`` is a file path
(SQLite) or a SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``); the
dialect module (smapq.store.dialects) does the rest: SQLite's pragmas and
cross-process write lock, PostgreSQL's pool and read-only sessions.

Never created by accident: a read-write SQLite engine opens the file with
``mode=rw``, so a missing database is an error instead of a new empty file. Only
``smapq init`` (and tests) pass ``create=True``. A PostgreSQL database is made by its
administrator; smapq only migrates it.
"""

from __future__ import annotations

from sqlalchemy import Engine

from smapq.store.dialects import for_database
from smapq.store.dialects.sqlite import sqlite_url

BUSY_TIMEOUT_MS = 5000

__all__ = ["BUSY_TIMEOUT_MS", "is_sqlite", "make_engine", "sqlite_url", "url_for"]


def is_sqlite(database: str) -> bool:
    return for_database(database).name == "sqlite"


def url_for(database: str, readonly: bool = False, create: bool = False) -> str:
    """``database`` is a SQLAlchemy URL or a file path."""
    if "://" in database:
        return database
    return sqlite_url(database, readonly, create)


def make_engine(
    database: str, readonly: bool = False, busy_ms: int = BUSY_TIMEOUT_MS, create: bool = False
) -> Engine:
    """An engine for ``database`` (path or URL); see the dialect modules for settings."""
    return for_database(database).make_engine(database, readonly, busy_ms, create)
