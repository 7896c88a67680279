"""Notice new mail without scanning the queue: the daemon's cheap change detector.

Purpose: between full scans (every ``wakeup`` seconds) the daemon asks ``changed()``
every few milliseconds. On SQLite that is ``PRAGMA data_version`` on a dedicated
read-only connection: the number changes whenever another connection commits, costs
no table read, and takes no lock. Other databases get ``PollWaker`` (never reports a
change, so only the ``wakeup`` scan finds mail) until a PostgreSQL waker does
``LISTEN smapq_queue`` and the receiver's insert is followed by ``NOTIFY``; the
daemon loop only needs ``changed()``, so that drops in here.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine

from smapq.store import queries
from smapq.store.engine import make_engine


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


def for_database(database: str) -> SqliteWaker | PollWaker:
    """The best change detector for ``database`` (a file path or a SQLAlchemy URL)."""
    if "://" in database and not database.startswith("sqlite"):
        return PollWaker()
    if "://" in database:
        database = database.split("///", 1)[-1]
    return SqliteWaker(database)
