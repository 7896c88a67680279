"""``LISTEN smapq_queue``: hear, without polling the queue, that mail became due.

Purpose: the PostgreSQL deliverer's change detector (smapq.deliver.waker). One
connection of its own in autocommit mode LISTENs on the channel the intake's commit,
requeue, release and a deliverer's exit NOTIFY. ``changed()`` reads what the socket
already holds (``PQconsumeInput`` never blocks) and reports whether any notification
came; it costs one ``recv`` and no query.

Faults: when the server goes away (restart, failover, network) the connection is
dropped and ``changed()`` answers True once -- notifications may have been missed, so
the caller scans the queue -- then tries to reconnect at most every ``RETRY_S``
seconds, answering True again when it is back. The deliverer's periodic ``wakeup``
scan is the fallback all along.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

from smapq.store.dialects.postgresql import CHANNEL, connect_args

RETRY_S = 1.0


class Listener:
    """A LISTEN connection to the queue database at ``url`` (a SQLAlchemy URL)."""

    def __init__(self, url: str) -> None:
        self._engine: Engine = create_engine(
            url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args=connect_args(url, readonly=False),
        )
        self._raw: Any = None  # the SQLAlchemy pool's connection record
        self._pg: Any = None  # psycopg's libpq connection (pgconn)
        self._next_try = 0.0
        self._connect()

    def _connect(self) -> bool:
        self._next_try = time.monotonic() + RETRY_S
        try:
            raw = self._engine.raw_connection()
        except Exception:  # the server is not there (yet): try again later
            return False
        try:
            driver: Any = raw.driver_connection
            driver.execute(f"LISTEN {CHANNEL}")
        except Exception:
            raw.invalidate()
            return False
        self._raw, self._pg = raw, driver.pgconn
        return True

    def _drop(self) -> None:
        raw, self._raw, self._pg = self._raw, None, None
        if raw is not None:
            try:
                raw.invalidate()
            except Exception:  # already broken: nothing more to release
                return

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def changed(self) -> bool:
        """True when a notification arrived since the last call (or may have been
        missed: the connection was lost or has just come back)."""
        pg = self._pg
        if pg is None:
            return time.monotonic() >= self._next_try and self._connect()
        try:
            pg.consume_input()
            heard = False
            while pg.notifies() is not None:
                heard = True
            lost = pg.status != 0  # CONNECTION_OK
        except Exception:
            lost = True
        if lost:
            self._drop()
            return True
        return heard

    def close(self) -> None:
        self._drop()
        self._engine.dispose()
