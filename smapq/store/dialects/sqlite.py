"""SQLite: pragmas, the cross-process write lock, plan hints, the authorizer guard.

Purpose: everything the store does differently on SQLite. Writers get WAL,
``synchronous=FULL`` (a WAL commit with NORMAL may roll back after power loss, which
would break the promise behind ``250``), a busy timeout, foreign keys, and ``BEGIN
IMMEDIATE`` so a claim takes the write lock before it reads (the huey #123 race).
Read-only engines open the file with ``mode=ro`` and ``query_only``.

Locking: writers also take the queue's cross-process write lock
(smapq.store.writelock, an flock on the database's directory) from BEGIN to COMMIT or
ROLLBACK, as every other writer of the file does, so the deliverer and admin verbs
queue up behind the receivers in arrival order instead of racing them in SQLite's
busy handler.

Never created by accident: a read-write engine opens the file with ``mode=rw``, so a
missing database is an error instead of a new empty file. Only ``smapq init`` (and
tests) pass ``create=True``, after making the file with the owner and mode the table
asks for.

Security: ``report sql`` runs under an SQLite authorizer, consulted by the SQL
compiler for every table, column and action: only reads, functions, recursive CTEs
and a list of read-only PRAGMAs pass, so ``ATTACH`` of a writable file, ``PRAGMA
query_only = 0`` or a ``COMMIT`` that would end the read-only transaction is refused
before it runs (on top of ``mode=ro`` and ``query_only``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, Integer, cast, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from smapq.store.dialects.base import Dialect, chunks
from smapq.store.writelock import WriteLock


def _uri_path(path: str) -> str:
    """``path`` for an SQLite ``file:`` URI: the characters a URI gives meaning escaped."""
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def sqlite_url(path: str, readonly: bool = False, create: bool = False) -> str:
    if create and not readonly:
        return f"sqlite:///{path}"
    mode = "ro" if readonly else "rw"
    return f"sqlite:///file:{_uri_path(path)}?mode={mode}&uri=true"


def database_path(database: str) -> str:
    """The file of a ``database`` setting (a path or an ``sqlite:///`` URL)."""
    return database.split("///", 1)[-1] if "://" in database else database


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


def _pragmas(engine: Engine, readonly: bool, busy_ms: int, lock: _EngineLock | None) -> None:
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
def _authorized(conn: Connection) -> Iterator[None]:
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    raw.set_authorizer(_authorize)
    try:
        yield
    finally:
        raw.set_authorizer(None)


class SqliteDialect(Dialect):
    name = "sqlite"

    def make_engine(self, database: str, readonly: bool, busy_ms: int, create: bool) -> Engine:
        if "://" in database:
            url, path = database, database_path(database)
        else:
            url, path = sqlite_url(database, readonly, create), database
        # NullPool: these are short-lived CLI processes and forking deliverers; a pooled
        # SQLite connection must never cross a fork.
        engine = create_engine(url, poolclass=NullPool)
        lock = None if readonly else _write_lock(engine, os.path.dirname(os.path.abspath(path)))
        _pragmas(engine, readonly, busy_ms, lock)
        return engine

    def deliverer_session(self, conn: Connection) -> None:
        """``synchronous=NORMAL`` on the deliverer's own connection.

        Safe for the deliverer only: the receiver's insert was fsynced at its COMMIT
        (FULL) and WAL is one log, so a power loss can drop only the deliverer's later
        commits (claim, sent_at, outcome). Each rolls a message back to an earlier
        state, which means a re-delivery (at-least-once), never a lost message. It saves
        an fsync per outcome, which otherwise bounds throughput on slow disks.
        """
        conn.connection.dbapi_connection.execute("PRAGMA synchronous = NORMAL")  # type: ignore[union-attr]

    def checkpoint(self, conn: Connection) -> bool:
        """Copy the WAL into the database now (PASSIVE: waits for nobody).

        Once every frame is copied, the next writer starts the WAL again from its
        beginning, reusing the space the file already holds instead of growing it --
        what lets a nearly full spool keep taking outcomes.
        """
        raw = conn.connection.dbapi_connection
        assert raw is not None
        sql = "PRAGMA wal_checkpoint(PASSIVE)"
        dbapi = conn.dialect.loaded_dbapi
        try:
            busy, log, done = raw.execute(sql).fetchone()
        except dbapi.Error as exc:  # the driver's own error: wrap it as SQLAlchemy would
            raise DBAPIError.instance(sql, None, exc, dbapi.Error) from exc
        return not busy and log == done

    def data_version(self, conn: Connection) -> int:
        """Differs between two calls iff another connection committed; no table read."""
        return int(conn.exec_driver_sql("PRAGMA data_version").scalar() or 0)

    def notify(self, conn: Connection) -> None:
        """Nothing to send: deliverers watch ``data_version``, which every commit moves."""

    def tune_for_reports(self, conn: Connection) -> None:
        """64 MiB page cache, temp b-trees in memory, 256 MiB mmap; none writes."""
        for pragma in ("cache_size = -65536", "temp_store = MEMORY", "mmap_size = 268435456"):
            conn.exec_driver_sql(f"PRAGMA {pragma}")

    def read_only(self, conn: Connection) -> None:
        """Nothing per transaction: read-only engines are ``mode=ro`` + ``query_only``."""

    def guard_operator_sql(self, conn: Connection) -> AbstractContextManager[None]:
        return _authorized(conn)

    def bucket(self, col: Any, step: int) -> Any:
        # SQLite's CAST truncates toward zero, which is floor for times after 1970.
        return cast(col / step, Integer) * step

    def join_hints(self) -> dict[str, str]:
        # SQLAlchemy renders no FROM hints for SQLite; CROSS JOIN fixes the join order.
        return {
            "cross": "CROSS JOIN",
            "hint": "INDEXED BY ix_messages_received_at",
            "id_hint": "INDEXED BY ix_messages_id_cover",
            "addr_hint": "INDEXED BY ix_recipients_address",
            "bytes_hint": "INDEXED BY ix_messages_id_cover",
        }

    def unordered(self, col: Any) -> Any:
        return col

    def table_scan(self, stmt: Any, table: Any) -> Any:
        return stmt.with_hint(table, "NOT INDEXED", "sqlite")

    def index_grouping(self, conn: Connection) -> AbstractContextManager[None]:
        """Nothing: SQLite groups by sorting, and by the index when one has the order."""
        return nullcontext()

    def stream(self, conn: Connection, stmt: Any) -> Iterable[Sequence[Any]]:
        """From the driver cursor of this same connection: SQLAlchemy's row objects cost
        more than the query itself at a million rows."""
        compiled = stmt.compile(dialect=conn.dialect)
        params = [compiled.params[name] for name in compiled.positiontup or ()]
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        return chunks(cursor.execute(str(compiled), params))


SQLITE = SqliteDialect()
