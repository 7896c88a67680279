"""SQLAlchemy engines for the queue database, with the pragmas durability needs.

Purpose: one place that knows how to open the queue. SQLite gets WAL,
``synchronous=FULL`` (a WAL commit with NORMAL may roll back after power loss, which
would break the promise behind ``250``), a busy timeout, foreign keys, and
``BEGIN IMMEDIATE`` for writers so a claim takes the write lock before it reads (the
huey #123 race). Read-only engines open the file with ``mode=ro`` and
``query_only`` so reports cannot write even by accident.

Writers also take the queue's cross-process write lock (smapq.store.writelock, an
flock on the database's directory) from BEGIN to COMMIT or ROLLBACK, as every other
writer of the file does, so the deliverer and admin verbs queue up behind the
receivers in arrival order instead of racing them in SQLite's busy handler.

Never created by accident: a read-write engine opens the file with ``mode=rw``, so a
missing database is an error instead of a new empty file (owned by whoever ran the
command, with the umask's mode). Only ``smapq init`` (and tests) pass ``create=True``,
after making the file with the owner and mode the table asks for.

A SQLAlchemy URL (``database postgresql+psycopg://...``) is passed through unchanged,
so the PostgreSQL backend drops in without touching callers.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.pool import NullPool

from smapq.store.writelock import WriteLock

BUSY_TIMEOUT_MS = 5000


def _uri_path(path: str) -> str:
    """``path`` for an SQLite ``file:`` URI: the characters a URI gives meaning escaped."""
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def sqlite_url(path: str, readonly: bool = False, create: bool = False) -> str:
    if create and not readonly:
        return f"sqlite:///{path}"
    mode = "ro" if readonly else "rw"
    return f"sqlite:///file:{_uri_path(path)}?mode={mode}&uri=true"


def url_for(database: str, readonly: bool = False, create: bool = False) -> str:
    """``database`` is a SQLAlchemy URL or a file path."""
    if "://" in database:
        return database
    return sqlite_url(database, readonly, create)


def make_engine(
    database: str, readonly: bool = False, busy_ms: int = BUSY_TIMEOUT_MS, create: bool = False
) -> Engine:
    """An engine for ``database`` (path or URL); see the module docstring for pragmas."""
    url = url_for(database, readonly, create)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    # NullPool: these are short-lived CLI processes and forking deliverers; a pooled
    # SQLite connection must never cross a fork.
    engine = create_engine(url, poolclass=NullPool)
    lock = None if readonly else _write_lock(engine, os.path.dirname(os.path.abspath(database)))
    _sqlite_pragmas(engine, readonly, busy_ms, lock)
    return engine


class _EngineLock:
    """The write lock for one engine's transactions: threads of this process take
    turns (flock does not tell them apart), processes take turns by flock."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.threads = threading.Lock()
        self.lock: WriteLock | None = None  # opened at the first write: init makes the dir
        self.owner = 0  # the thread in a write transaction, 0 for none

    def acquire(self) -> None:
        self.threads.acquire()
        try:
            if self.lock is None:
                self.lock = WriteLock(self.directory)
            self.lock.acquire()
        except BaseException:
            self.threads.release()
            raise
        self.owner = threading.get_ident()

    def release(self) -> None:
        """End this thread's write transaction (a rollback of a connection that had
        none, e.g. on its return to the pool, releases nothing)."""
        if self.owner == threading.get_ident():
            self.owner = 0
            assert self.lock is not None
            self.lock.release()
            self.threads.release()


def _write_lock(engine: Engine, directory: str) -> _EngineLock:
    lock = _EngineLock(directory)
    dialect: Any = engine.dialect
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    # The lock is released after COMMIT/ROLLBACK has run (SQLAlchemy's commit and
    # rollback events come before it): this engine's dialect calls them, so they are
    # wrapped on it.
    def commit(dbapi_conn: Any) -> None:
        try:
            do_commit(dbapi_conn)
        finally:
            lock.release()

    def rollback(dbapi_conn: Any) -> None:
        try:
            do_rollback(dbapi_conn)
        finally:
            lock.release()

    dialect.do_commit = commit
    dialect.do_rollback = rollback
    return lock


def _sqlite_pragmas(
    engine: Engine, readonly: bool, busy_ms: int, lock: _EngineLock | None
) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the pysqlite driver: we emit BEGIN ourselves.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
        if readonly:
            cur.execute("PRAGMA query_only = ON")
        else:
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if lock is None:
            conn.exec_driver_sql("BEGIN")
            return
        # The queue's write lock first, SQLite's after: a writer waiting for its turn
        # must not hold SQLite's lock, or the one whose turn it is waits on it in turn.
        lock.acquire()
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            lock.release()
            raise
