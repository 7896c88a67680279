"""Notice new mail without scanning the queue: the daemon's cheap change detector.

Purpose: between full scans (every ``wakeup`` seconds) the daemon asks ``changed()``
every few milliseconds. On SQLite that is ``PRAGMA data_version`` on a dedicated
read-only connection: the number changes whenever another connection commits, costs
no table read, and takes no lock. On PostgreSQL it is ``LISTEN smapq_queue``
(smapq.store.listen): the intake's commit, requeue, release and a deliverer's exit
send ``NOTIFY``; a lost connection counts as a change and is re-made. ``PollWaker``
never reports a change (``--once`` and unknown engines): only the scan finds mail.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import Connection, Engine

from smapq.store import queries
from smapq.store.dialects.sqlite import database_path
from smapq.store.engine import is_sqlite, make_engine
from smapq.store.listen import Listener


class Waker(Protocol):
    def changed(self) -> bool: ...

    def close(self) -> None: ...


class PollWaker:
    """No change detection: rely on the periodic scan."""

    def changed(self) -> bool:
        return False

    def close(self) -> None:
        return None


class SqliteWaker:
    """``PRAGMA data_version`` on its own connection."""

    def __init__(self, database: str) -> None:
        self._engine: Engine = make_engine(database, readonly=True)
        self._conn: Connection = self._engine.connect()
        self._last = self._version()

    def _version(self) -> int:
        with self._conn.begin():
            return queries.data_version(self._conn)

    def changed(self) -> bool:
        version = self._version()
        if version == self._last:
            return False
        self._last = version
        return True

    def close(self) -> None:
        self._conn.close()
        self._engine.dispose()


class PostgresWaker:
    """``LISTEN smapq_queue`` on its own autocommit connection."""

    def __init__(self, database: str) -> None:
        self._listener = Listener(database)

    def changed(self) -> bool:
        return self._listener.changed()

    def close(self) -> None:
        self._listener.close()


def for_database(database: str) -> Waker:
    """The best change detector for ``database`` (a file path or a SQLAlchemy URL)."""
    if is_sqlite(database):
        return SqliteWaker(database_path(database))
    return PostgresWaker(database)
