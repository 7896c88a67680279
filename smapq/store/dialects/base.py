"""What differs between the queue's database engines, as one interface.

Purpose: every dialect-specific choice the store makes -- connection set-up, plan
hints, change detection, the read-only guard, locking, date bucketing -- is a method
here, implemented once per engine (``sqlite.py``, ``postgresql.py``). The queries in
``smapq.store.queries`` are written once and ask ``dialect_of(conn)`` for the rest, so
no query function branches on the engine's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection, Engine


class Dialect:
    """The interface; see ``sqlite.SqliteDialect`` and ``postgresql.PostgresDialect``."""

    name = ""
    # One snapshot per write transaction (SQLite: writers are serialised, nothing
    # commits between two statements of ours); False where each statement sees the
    # commits made since the one before (PostgreSQL's READ COMMITTED).
    stable_writes = True
    # percentile_disc() WITHIN GROUP (ORDER BY ...): exact percentiles on the server.
    ordered_set_aggregates = False
    # WITH x AS (UPDATE ... RETURNING ...) INSERT ...: one statement (one round trip)
    # writes a row and its event; SQLite runs the two statements.
    writing_ctes = False

    def make_engine(self, database: str, readonly: bool, busy_ms: int, create: bool) -> Engine:
        """An engine for ``database`` (a path or URL), writers or read-only."""
        raise NotImplementedError

    def deliverer_session(self, conn: Connection) -> None:
        """Per-connection settings of the deliverer's own connection (not in a txn)."""
        raise NotImplementedError

    def checkpoint(self, conn: Connection) -> bool:
        """Fold the write-ahead log back now, if the engine has one of ours to fold.
        True when nothing is left to fold."""
        raise NotImplementedError

    def data_version(self, conn: Connection) -> int:
        """A number that changes when another connection committed (0: not known)."""
        raise NotImplementedError

    def notify(self, conn: Connection) -> None:
        """Tell waiting deliverers, at this transaction's commit, that mail is due."""
        raise NotImplementedError

    def tune_for_reports(self, conn: Connection) -> None:
        """Per-connection read tuning for big reports; never writes."""
        raise NotImplementedError

    def read_only(self, conn: Connection) -> None:
        """Make the current transaction read-only, by the database."""
        raise NotImplementedError

    def guard_operator_sql(self, conn: Connection) -> AbstractContextManager[None]:
        """Around the operator's own statement (``report sql``): writes refused."""
        raise NotImplementedError

    def bucket(self, col: Any, step: int) -> Any:
        """Start of the ``step``-second period holding ``col`` (epoch seconds, > 0)."""
        raise NotImplementedError

    def join_hints(self) -> dict[str, str]:
        """Text for the recipient-ranking SQL: ``cross`` (join keyword fixing the
        order), ``hint``/``id_hint``/``addr_hint`` (index choice), or plain joins."""
        raise NotImplementedError

    def unordered(self, col: Any) -> Any:
        """``col`` to ORDER BY when the planner should not walk an index for its order
        (the rows wanted are few and clustered at one end of it)."""
        raise NotImplementedError

    def table_scan(self, stmt: Any, table: Any) -> Any:
        """``stmt`` reading ``table`` itself rather than through an index."""
        raise NotImplementedError

    def stream(self, conn: Connection, stmt: Any) -> Iterable[Sequence[Any]]:
        """The rows of ``stmt`` as plain tuples, streamed (millions of rows)."""
        raise NotImplementedError

    def index_grouping(self, conn: Connection) -> AbstractContextManager[None]:
        """Around a GROUP BY over an index that delivers its many groups in order
        (a ranking of ~10^5 keys over a million rows): group in that order, not by
        hashing. Fetch the rows inside."""
        raise NotImplementedError


def chunks(cursor: Any, size: int = 10_000) -> Iterator[Sequence[Any]]:
    """A DBAPI cursor's rows, fetched ``size`` at a time, closed at the end."""
    try:
        while rows := cursor.fetchmany(size):
            yield from rows
    finally:
        cursor.close()
