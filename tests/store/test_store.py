"""The store API on each backend: one-transaction insert, queue ids; SQLite's pragmas
and locks on SQLite."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from smapq.store import migrate, queries, states
from smapq.store.engine import make_engine
from smapq.store.ids import QUEUE_ID_LEN, new_queue_id


@pytest.fixture
def engine(database: str) -> Engine:
    e = make_engine(database, create=True)
    migrate.upgrade(e)
    return e


def _message(queue_id: str | None = None) -> dict[str, object]:
    return {
        "queue_id": queue_id or new_queue_id(),
        "protocol": "ESMTP",
        "mail_from": "a@example.org",
        "size": 4,
        "trace": "Received: from x\r\n",
        "body": b"hi\r\n",
        "body_sha256": "0" * 64,
        "client_addr": "192.0.2.1",
    }


@pytest.mark.sqlite_only("SQLite pragmas")
def test_writer_pragmas_are_durable(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000


def test_insert_message_with_recipients_and_events(engine: Engine) -> None:
    msg = _message()
    with engine.begin() as conn:
        mid = queries.insert_message(
            conn,
            msg,
            ["b@example.org", "c@example.org"],
            [{"kind": "accept", "queue_id": msg["queue_id"], "code": 250}],
        )
    with engine.connect() as conn:
        row = queries.message_by_queue_id(conn, str(msg["queue_id"]))
        assert row is not None and row.id == mid
        assert row.state == states.RECEIVED and row.attempts == 0
        assert row.next_attempt_at == row.received_at
        assert [r.address for r in queries.recipients_of(conn, mid)] == [
            "b@example.org",
            "c@example.org",
        ]
        assert [e.kind for e in queries.events_of(conn, str(msg["queue_id"]))] == ["accept"]
        assert queries.count_by_state(conn) == {"received": 1}


def test_failed_transaction_leaves_nothing(engine: Engine) -> None:
    msg = _message("DUPLICATEID00000")
    with engine.begin() as conn:
        queries.insert_message(conn, msg, ["b@example.org"])
    with pytest.raises(IntegrityError), engine.begin() as conn:
        queries.insert_message(conn, _message("FRESHID000000000"), ["x@example.org"])
        queries.insert_message(conn, msg, ["y@example.org"])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM recipients")).scalar() == 1
        assert queries.message_by_queue_id(conn, "FRESHID000000000") is None


def test_state_check_constraint(engine: Engine) -> None:
    with pytest.raises(IntegrityError), engine.begin() as conn:
        queries.insert_message(conn, {**_message(), "state": "lost"}, [])


def test_recipients_cascade_with_their_message(engine: Engine) -> None:
    with engine.begin() as conn:
        mid = queries.insert_message(conn, _message(), ["b@example.org"])
        conn.execute(text("DELETE FROM messages WHERE id = :id"), {"id": mid})
        assert conn.execute(text("SELECT count(*) FROM recipients")).scalar() == 0


def test_readonly_engine_cannot_write(engine: Engine, database: str) -> None:
    ro = make_engine(database, readonly=True)
    try:
        with pytest.raises(Exception, match=r"readonly|read-only|attempt to write"):
            with ro.begin() as conn:
                conn.execute(text("DELETE FROM events"))
    finally:
        ro.dispose()  # its pooled PostgreSQL connection, closed before the GC finds it


@pytest.mark.sqlite_only("SQLite's write lock")
def test_writers_take_the_lock_at_begin(engine: Engine, tmp_path: Path) -> None:
    with engine.begin():
        other = sqlite3.connect(str(tmp_path / "q.db"), timeout=0.05)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()


def test_queue_ids_are_unique_and_sort_by_time() -> None:
    ids = [new_queue_id(1_700_000_000 + i / 1000) for i in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == QUEUE_ID_LEN and i.isalnum() for i in ids)


@pytest.mark.sqlite_only("the flock and SQLite's write lock")
def test_writers_take_the_queue_write_lock_before_sqlites(engine: Engine, tmp_path: Path) -> None:
    """A writer waiting for the queue's write lock (smapq.store.writelock) holds no
    SQLite lock meanwhile: the order is flock, then BEGIN IMMEDIATE.  The other order
    deadlocked a serve writer (holding the flock, waiting for SQLite's lock) with the
    deliverer (holding SQLite's lock, waiting for the flock) until the busy timeout."""
    import fcntl
    import os
    import threading
    import time

    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        done.set()

    worker = threading.Thread(target=write)
    worker.start()
    try:
        time.sleep(0.3)  # the writer is waiting for the flock by now
        assert not done.is_set()
        other = sqlite3.connect(tmp_path / "q.db", timeout=0, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # SQLite's write lock is free: it holds none
        other.execute("ROLLBACK")
        other.close()
        held = os.open(tmp_path, os.O_RDONLY)  # and the flock is still ours alone
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(held)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        worker.join(30)
    assert done.is_set()
    free = os.open(tmp_path, os.O_RDONLY)  # released after its COMMIT
    fcntl.flock(free, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(free)
