"""``smapq report sql``: the operator's own SELECT, where writing is impossible.

Security: not a keyword filter. Layers below the statement text make writes
impossible. SQLite: the engine opens the file ``mode=ro`` and sets ``query_only``; an
SQLite authorizer (consulted by the SQL compiler for every table, column and action)
allows only reads, functions, recursive CTEs and a list of read-only PRAGMAs -- so
``ATTACH`` of a writable file, ``PRAGMA query_only = 0`` or a ``COMMIT`` that would
end our read-only transaction is refused before it runs. PostgreSQL: the session is
``default_transaction_read_only`` and the transaction ``READ ONLY``; a read-only
role (docs/reports.md) is the last layer. Both live in smapq.store.dialects.

Output: values as stored; in tables, columns named ``at`` or ``*_at`` (the schema's
epoch-second times) are shown as UTC times, and blobs as their size and first text.

Diagnostics: any error from the database (syntax, unknown table, refused action, more
than one statement) is one line ``sql: <reason>`` and exit 64.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection

from smapq.errors import UsageError
from smapq.report.db import translated
from smapq.report.output import Column, Report
from smapq.store import queries


def run(conn: Connection, statement: str, now: float, limit: int | None = None) -> Report:
    """Run ``statement`` on read-only ``conn``; the report streams its rows.

    The caller must consume ``report.rows`` while ``conn`` is open.
    """
    if not statement.strip():
        raise UsageError("sql: empty statement")
    # Begin first: the engine's own BEGIN is not the operator's statement.
    conn.exec_driver_sql("SELECT 1").close()
    with translated("sql", usage=True), queries.guard_operator_sql(conn):
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
