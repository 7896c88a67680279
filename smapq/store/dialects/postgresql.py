"""PostgreSQL: connection set-up, read-only by the server, NOTIFY, date bucketing.

Purpose: everything the store does differently on PostgreSQL. No queue write lock:
concurrent deliverers claim with ``FOR UPDATE SKIP LOCKED`` and row locks do the
rest. Read-only engines ask the server for it (``default_transaction_read_only``),
so a report's connection cannot write whatever its SQL says.

Connection: the URL goes to libpq as it is, so a password may come from
``~/.pgpass`` (``PGPASSFILE``), a service from ``pg_service.conf`` (``?service=``,
``PGSERVICE``), and every other ``PG*`` variable applies. An unset connect timeout
becomes 10 s (a CLI must not hang on an unreachable server).

Change detection: ``NOTIFY smapq_queue`` in the transaction that makes mail due (the
intake's commit, requeue, release); deliverers ``LISTEN`` (smapq.deliver.waker).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func
from sqlalchemy.engine import make_url

from smapq.store.dialects.base import Dialect

CHANNEL = "smapq_queue"
CONNECT_TIMEOUT_S = 10


def connect_args(database: str, readonly: bool) -> dict[str, Any]:
    """Extra libpq parameters for ``database``; the URL's own take precedence."""
    query = make_url(database).query
    args: dict[str, Any] = {}
    if "application_name" not in query and "PGAPPNAME" not in os.environ:
        args["application_name"] = "smapq"
    if "connect_timeout" not in query and "PGCONNECT_TIMEOUT" not in os.environ:
        args["connect_timeout"] = CONNECT_TIMEOUT_S
    if readonly:
        options = query.get("options", "")
        mine = "-c default_transaction_read_only=on"
        args["options"] = f"{options} {mine}".strip() if isinstance(options, str) else mine
    return args


def libpq_url(database: str) -> str:
    """``database`` as psycopg/libpq takes it: the SQLAlchemy driver suffix dropped."""
    scheme, rest = database.split("://", 1)
    return scheme.split("+", 1)[0] + "://" + rest


def _durable_commits(dbapi_conn: Any, _record: Any) -> None:
    """A writer's COMMIT is flushed before it returns, whatever the server's default.

    With ``synchronous_commit = off`` a crash loses the last commits: a claim or an
    outcome rolled back means the message goes out again (duplicates beyond what was in
    flight). Only ``off`` is raised to ``on``: ``local``, ``remote_write`` and
    ``remote_apply`` already flush locally and are the administrator's choice.
    """
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SELECT current_setting('synchronous_commit')")
        row = cur.fetchone()
        if row is not None and row[0] == "off":
            cur.execute("SET synchronous_commit = on")
    finally:
        cur.close()
    dbapi_conn.commit()  # a SET inside the driver's implicit transaction must stick


@contextmanager
def _read_only_txn(conn: Connection) -> Iterator[None]:
    conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    yield


@contextmanager
def _no_hash_aggregation(conn: Connection) -> Iterator[None]:
    # With the reports' work_mem the planner takes a HashAggregate over a sequential
    # scan for the cheaper plan; for 200,000 addresses over 1.3M recipient rows it is
    # 3x slower than grouping the index-only scan in its order (0.9 s vs 0.3 s).
    conn.exec_driver_sql("SET enable_hashagg = off")
    yield
    # Not in a finally: after an error the transaction's rollback undoes the SET.
    conn.exec_driver_sql("RESET enable_hashagg")


class PostgresDialect(Dialect):
    name = "postgresql"
    stable_writes = False
    ordered_set_aggregates = True
    writing_ctes = True

    def make_engine(self, database: str, readonly: bool, busy_ms: int, create: bool) -> Engine:
        # busy_ms and create mean nothing here: rows, not the database, are locked,
        # and a database is created by its administrator, not by us.
        # pre_ping: a connection that outlived a server restart is replaced, not used.
        engine = create_engine(
            database,
            pool_size=4,
            max_overflow=8,
            pool_pre_ping=True,
            connect_args=connect_args(database, readonly),
        )
        if not readonly:
            event.listen(engine, "connect", _durable_commits)
        return engine

    def deliverer_session(self, conn: Connection) -> None:
        """Nothing: the server's commit settings stand."""

    def checkpoint(self, conn: Connection) -> bool:
        """Nothing to do: the server manages its own WAL."""
        return True

    def data_version(self, conn: Connection) -> int:
        """Not known here: deliverers LISTEN instead (smapq.deliver.waker)."""
        return 0

    def notify(self, conn: Connection) -> None:
        # Delivered at COMMIT, and only if the transaction commits.
        conn.exec_driver_sql(f"NOTIFY {CHANNEL}")

    def tune_for_reports(self, conn: Connection) -> None:
        """Sorts and hashes of a million rows in memory; no JIT start-up cost."""
        conn.exec_driver_sql("SET work_mem = '64MB'")
        conn.exec_driver_sql("SET jit = off")

    def read_only(self, conn: Connection) -> None:
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    def guard_operator_sql(self, conn: Connection) -> AbstractContextManager[None]:
        return _read_only_txn(conn)

    def bucket(self, col: Any, step: int) -> Any:
        return func.floor(col / step) * step

    def join_hints(self) -> dict[str, str]:
        return {"cross": "JOIN", "hint": "", "id_hint": "", "addr_hint": "", "bytes_hint": ""}

    def unordered(self, col: Any) -> Any:
        # An expression, not the column: no index provides its order.
        return col + 0

    def table_scan(self, stmt: Any, table: Any) -> Any:
        return stmt

    def stream(self, conn: Connection, stmt: Any) -> Iterable[Sequence[Any]]:
        return conn.execution_options(stream_results=True).execute(stmt)

    def index_grouping(self, conn: Connection) -> AbstractContextManager[None]:
        return _no_hash_aggregation(conn)


POSTGRESQL = PostgresDialect()
