"""``smapq report sql``: the operator's own SELECT, where writing is impossible.

Security: not a keyword filter. Three layers below the statement text make writes
impossible: the engine opens the SQLite file ``mode=ro`` and sets ``query_only``; an
SQLite authorizer (consulted by the SQL compiler for every table, column and action)
allows only reads, functions, recursive CTEs and a list of read-only PRAGMAs -- so
``ATTACH`` of a writable file, ``PRAGMA query_only = 0`` or a ``COMMIT`` that would
end our read-only transaction is refused before it runs; on PostgreSQL the
transaction is ``READ ONLY``.

Output: values as stored; in tables, columns named ``at`` or ``*_at`` (the schema's
epoch-second times) are shown as UTC times, and blobs as their size and first text.

Diagnostics: any error from the database (syntax, unknown table, refused action, more
than one statement) is one line ``sql: <reason>`` and exit 64.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection

from smapq.errors import UsageError
from smapq.report.db import translated
from smapq.report.output import Column, Report
from smapq.store import queries

_ALLOWED = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        sqlite3.SQLITE_RECURSIVE,
    }
)
# PRAGMAs that only report; with an argument only the introspection ones.
_PRAGMAS_WITH_ARG = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
_PRAGMAS_NO_ARG = frozenset(
    {
        "table_list",
        "database_list",
        "page_count",
        "page_size",
        "freelist_count",
        "user_version",
        "schema_version",
        "data_version",
        "journal_mode",
        "compile_options",
        "quick_check",
        "integrity_check",
    }
)


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 is not None:
        name = arg1.lower()
        if name in _PRAGMAS_WITH_ARG or (name in _PRAGMAS_NO_ARG and arg2 is None):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


@contextmanager
def _guarded(conn: Connection) -> Iterator[None]:
    raw = conn.connection.driver_connection
    if not isinstance(raw, sqlite3.Connection):
        queries.set_read_only(conn)
        yield
        return
    raw.set_authorizer(_authorize)
    try:
        yield
    finally:
        raw.set_authorizer(None)


def run(conn: Connection, statement: str, now: float, limit: int | None = None) -> Report:
    """Run ``statement`` on read-only ``conn``; the report streams its rows.

    The caller must consume ``report.rows`` while ``conn`` is open.
    """
    if not statement.strip():
        raise UsageError("sql: empty statement")
    # Begin first: the engine's own BEGIN is not the operator's statement.
    conn.exec_driver_sql("SELECT 1").close()
    with translated("sql", usage=True), _guarded(conn):
        names, rows = queries.run_sql(conn, statement)
    if not names:
        raise UsageError("sql: the statement returns no rows; only queries run here")
    columns = [
        Column(n or f"column{i + 1}", _kind(n), title=n or "?") for i, n in enumerate(names)
    ]
    for c in columns:
        c.flex = True
    report = Report("sql", columns, (), generated_at=now)
    report.rows = _guard_iter(report.limit(rows, limit))
    return report


def _kind(name: str | None) -> str:
    # The schema's convention: times are float epoch seconds in columns named *_at.
    return "epoch" if name and (name == "at" or name.endswith("_at")) else "raw"


def _guard_iter(rows: Iterator[Any]) -> Iterator[Any]:
    # Errors can surface while stepping through rows (e.g. a runtime function error).
    with translated("sql", usage=True):
        yield from rows
