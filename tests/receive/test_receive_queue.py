"""The receiver's transaction on a real SQLite file: all or nothing, errors as replies."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from smapq.receive.queue import Queue, StoreError
from smapq.smtp import replies as R
from smapq.smtp.session import Envelope
from tests.conftest import Spool, make_spool

SESSION = {
    "session_id": "S1",
    "client_addr": "192.0.2.1",
    "client_port": 2525,
    "client_name": None,
}


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


def envelope(body: bytes = b"hello\r\n", rcpts: list[str] | None = None) -> Envelope:
    return Envelope("a@b.c", rcpts or ["d@e.f", "g@h.i"], body, "client", "ESMTP", {})


def count(spool: Spool, table: str) -> int:
    with sqlite3.connect(spool.db) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return make_spool(tmp_path)


def test_accept_writes_message_recipients_and_events_together(spool: Spool) -> None:
    q = Queue(str(spool.db))
    connect, mail, acc = event("connect"), event("mail", "a@b.c"), event("accept", "a@b.c")
    qid = q.accept(
        envelope(),
        SESSION,
        [connect, mail, acc],
        [mail, acc],
        lambda qid: f"Received: by x id {qid}\r\n",
        1000.0,
    )
    q.close()
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
    q = Queue(str(spool.db))
    bad = event("mail")
    bad["kind"] = None  # NOT NULL: fails after the message and recipients were inserted
    with pytest.raises(StoreError) as err:
        q.accept(envelope(), SESSION, [bad], [bad], lambda qid: "", 1.0)
    q.close()
    assert err.value.reply == R.R451_STORE_FAILED
    assert bad["queue_id"] is None  # the rows go to the session log without a queue id
    assert (count(spool, "messages"), count(spool, "recipients"), count(spool, "events")) == (
        0,
        0,
        0,
    )


def test_busy_database_is_451(spool: Spool) -> None:
    blocker = sqlite3.connect(spool.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    q = Queue(str(spool.db), busy_ms=50)
    try:
        with pytest.raises(StoreError) as err:
            q.accept(envelope(), SESSION, [], [], lambda qid: "", 1.0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert err.value.reply == R.R451_STORE_FAILED
    assert "locked" in err.value.reason
    q.accept(envelope(), SESSION, [], [], lambda qid: "", 1.0)  # and then it works
    q.close()
    assert count(spool, "messages") == 1


def test_full_database_is_452(spool: Spool) -> None:
    q = Queue(str(spool.db))
    pages = q.conn.execute("PRAGMA page_count").fetchone()[0]
    q.conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(StoreError) as err:
        q.accept(envelope(b"x" * 200_000 + b"\r\n"), SESSION, [], [], lambda qid: "", 1.0)
    q.close()
    assert err.value.reply == R.R452_NO_SPACE
    assert count(spool, "messages") == 0


def test_missing_database_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as err:
        Queue(str(tmp_path / "nope.db"))
    assert err.value.reply == R.R451_STORE_FAILED
    assert not (tmp_path / "nope.db").exists()


def test_session_events_without_a_message(spool: Spool) -> None:
    q = Queue(str(spool.db))
    q.log([event("connect"), event("disconnect")])
    q.log([])
    q.close()
    assert count(spool, "events") == 2
