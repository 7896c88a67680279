"""The intake's SQLite backend on a real file: all or nothing, group commit, the write
lock, errors as replies."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from smapq.intake.port import StoreError, Submission
from smapq.smtp import replies as R
from smapq.store.intake_sqlite import SqliteIntake
from tests.conftest import Spool, make_spool


def event(kind: str, address: str | None = None) -> dict[str, object]:
    return {
        "at": 1.0,
        "kind": kind,
        "session_id": "S1",
        "queue_id": None,
        "client_addr": "192.0.2.1",
        "address": address,
        "code": 250,
        "detail": None,
    }


def message(body: bytes = b"hello\r\n") -> dict[str, object]:
    return {
        "session_id": "S1",
        "client_addr": "192.0.2.1",
        "client_port": 2525,
        "client_name": None,
        "state": "received",
        "received_at": 1000.0,
        "helo": "client",
        "protocol": "ESMTP",
        "mail_from": "a@b.c",
        "size": len(body),
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "next_attempt_at": 1000.0,
        "updated_at": 1000.0,
    }


def submission(
    body: bytes = b"hello\r\n",
    rcpts: list[str] | None = None,
    events: list[dict[str, object]] | None = None,
    tagged: list[dict[str, object]] | None = None,
) -> Submission:
    sub = Submission(
        message(body),
        rcpts or ["d@e.f", "g@h.i"],
        events or [],
        tagged or [],
        lambda qid: f"Received: by x id {qid}\r\n",
    )
    sub.renew_id()
    return sub


def count(spool: Spool, table: str) -> int:
    with sqlite3.connect(spool.db) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path)


def test_accept_writes_message_recipients_and_events_together(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    connect, mail, acc = event("connect"), event("mail", "a@b.c"), event("accept", "a@b.c")
    sub = submission(events=[connect, mail, acc], tagged=[mail, acc])
    assert q.accept([sub]) == [None]
    q.close()
    qid = sub.queue_id
    with sqlite3.connect(spool.db) as db:
        msg = db.execute(
            "SELECT queue_id, state, body, body_sha256, trace, client_addr, client_port,"
            " next_attempt_at FROM messages"
        ).fetchone()
        rcpts = db.execute("SELECT position, address FROM recipients").fetchall()
        evs = db.execute("SELECT kind, queue_id FROM events ORDER BY id").fetchall()
    assert msg[:3] == (qid, "received", b"hello\r\n")
    assert msg[3] == hashlib.sha256(b"hello\r\n").hexdigest()
    assert msg[4] == f"Received: by x id {qid}\r\n"
    assert msg[5:] == ("192.0.2.1", 2525, 1000.0)
    assert rcpts == [(0, "d@e.f"), (1, "g@h.i")]
    assert evs == [("connect", None), ("mail", qid), ("accept", qid)]
    assert connect["queue_id"] is None and mail["queue_id"] == acc["queue_id"] == qid


def test_a_failing_row_leaves_nothing(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    bad = event("mail")
    bad["kind"] = None  # NOT NULL: fails after the message and recipients were inserted
    sub = submission(events=[bad], tagged=[bad])
    (err,) = q.accept([sub])
    q.close()
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert (count(spool, "messages"), count(spool, "recipients"), count(spool, "events")) == (
        0,
        0,
        0,
    )


def test_a_batch_commits_together_and_a_bad_submission_fails_alone(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    bad = event("mail")
    bad["kind"] = None
    good1, good2 = submission(b"one\r\n"), submission(b"two\r\n")
    loose = Submission(None, (), [event("connect"), event("disconnect")])
    results = q.accept([good1, submission(events=[bad], tagged=[bad]), loose, good2])
    q.close()
    assert results[0] is None and results[2] is None and results[3] is None
    assert results[1] is not None and results[1].reply == R.R451_STORE_FAILED
    with sqlite3.connect(spool.db) as db:
        bodies = [r[0] for r in db.execute("SELECT body FROM messages ORDER BY id")]
    assert bodies == [b"one\r\n", b"two\r\n"]
    assert count(spool, "recipients") == 4
    assert count(spool, "events") == 2


def test_a_queue_id_collision_takes_a_new_id(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    first = submission()
    assert q.accept([first]) == [None]
    mail = event("mail")
    second = submission(events=[mail], tagged=[mail])
    assert second.message is not None
    second.message["queue_id"] = first.queue_id  # as if two receivers met in one microsecond
    second.message["trace"] = f"Received: by x id {first.queue_id}\r\n"
    assert q.accept([second]) == [None]
    q.close()
    assert second.queue_id != first.queue_id
    with sqlite3.connect(spool.db) as db:
        rows = db.execute("SELECT queue_id, trace FROM messages ORDER BY id").fetchall()
        tagged = db.execute("SELECT queue_id FROM events").fetchall()
    assert rows[1] == (second.queue_id, f"Received: by x id {second.queue_id}\r\n")
    assert tagged == [(second.queue_id,)]


def test_busy_database_is_451(spool: Spool) -> None:
    blocker = sqlite3.connect(spool.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # a writer that does not take the write lock
    q = SqliteIntake(str(spool.db), busy_ms=50)
    try:
        (err,) = q.accept([submission()])
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert "locked" in err.reason
    assert q.accept([submission()]) == [None]  # and then it works
    q.close()
    assert count(spool, "messages") == 1


def test_writers_wait_for_the_write_lock_in_turn(spool: Spool) -> None:
    """A holder of the directory lock makes the commit wait, not fail; it goes through
    as soon as the lock is released."""
    fd = os.open(spool.directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    q = SqliteIntake(str(spool.db), busy_ms=50, lock_wait=None)
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.extend(q.accept([submission()])))
    try:
        worker.start()
        time.sleep(0.3)  # far longer than the busy timeout: still waiting, not failed
        assert results == []
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    worker.join(30)
    q.close()
    assert results == [None]
    assert count(spool, "messages") == 1


def test_write_lock_wait_is_bounded_in_the_receiver(spool: Spool) -> None:
    fd = os.open(spool.directory, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    q = SqliteIntake(str(spool.db), lock_wait=0.2)
    try:
        (err,) = q.accept([submission()])
    finally:
        os.close(fd)
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert "no write lock" in err.reason
    assert q.accept([submission()]) == [None]
    q.close()


def test_full_database_is_452(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    pages = q.conn.execute("PRAGMA page_count").fetchone()[0]
    q.conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    (err,) = q.accept([submission(b"x" * 200_000 + b"\r\n")])
    q.close()
    assert err is not None and err.reply == R.R452_NO_SPACE
    assert count(spool, "messages") == 0


def test_missing_database_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        SqliteIntake(str(tmp_path / "nope.db"))
    assert err.value.reply == R.R451_STORE_FAILED
    assert not (tmp_path / "nope.db").exists()


def test_session_events_without_a_message(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    assert q.accept([Submission(None, (), [event("connect"), event("disconnect")])]) == [None]
    q.close()
    assert count(spool, "events") == 2


def test_free_space_is_the_unprivileged_space_of_the_spool(spool: Spool) -> None:
    q = SqliteIntake(str(spool.db))
    st = os.statvfs(spool.directory)
    free = q.free_space()
    q.close()
    assert free is not None
    assert abs(free - st.f_bavail * st.f_frsize) < 64 * 1024 * 1024
