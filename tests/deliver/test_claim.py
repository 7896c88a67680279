"""The deliverer's queries on a real queue (each backend): claim, lease, fencing, recovery."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite

from smapq.store import migrate, queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id


@pytest.fixture
def engine(database: str) -> Engine:
    e = make_engine(database, create=True)
    migrate.upgrade(e)
    return e


def _add(engine: Engine, due: float = 0.0, rcpts: tuple[str, ...] = ("r@x",)) -> str:
    qid = new_queue_id()
    body = b"hi\n"
    msg = {
        "queue_id": qid,
        "protocol": "SMTP",
        "mail_from": "s@x",
        "size": 3,
        "trace": "",
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "received_at": 1.0,
        "next_attempt_at": due or 1.0,
    }
    with engine.begin() as conn:
        queries.insert_message(conn, msg, list(rcpts))
    return qid


def _claim(engine: Engine, owner: str, now: float, limit: int = 10) -> list[str]:
    with engine.begin() as conn:
        return [r.queue_id for r in queries.claim(conn, owner, now, 60, limit)]


def test_claim_takes_due_rows_oldest_first_up_to_the_limit(engine: Engine) -> None:
    late = _add(engine, due=50.0)
    early = _add(engine, due=10.0)
    future = _add(engine, due=1000.0)
    assert _claim(engine, "a", now=100.0, limit=1) == [early]
    assert _claim(engine, "a", now=100.0) == [late]
    assert _claim(engine, "a", now=100.0) == []
    with engine.begin() as conn:
        row = queries.message_by_queue_id(conn, early)
        assert row is not None
        assert (row.state, row.lease_owner, row.lease_expires_at) == ("delivering", "a", 160.0)
        assert row.lease_token == 1
        [event] = queries.events_of(conn, early)
        # The same row on both backends (PostgreSQL writes it in the claim's statement).
        got = (event.kind, event.at, event.detail, event.session_id, event.client_addr)
        assert got == ("claim", 100.0, "a token 1", None, None)
        assert (event.address, event.code) == (None, None)
    assert future not in _claim(engine, "a", now=999.0)


def test_a_late_finisher_cannot_overwrite_a_newer_claim(engine: Engine) -> None:
    qid = _add(engine)
    with engine.begin() as conn:
        [first] = queries.claim(conn, "old", 100.0, 60, 10)
    # The old owner stalls past its lease; the next poll recovers and re-claims.
    with engine.begin() as conn:
        assert [r.queue_id for r in queries.recover_expired(conn, 200.0)] == [qid]
        [second] = queries.claim(conn, "new", 200.0, 60, 10)
    assert second.lease_token == first.lease_token + 1
    with engine.begin() as conn:
        assert not queries.renew_leases(conn, "old", [first.id], 500.0)
        [rid] = [r.id for r in queries.unsent_recipients(conn, [first.id])]
        assert not queries.mark_sent(conn, first.id, first.lease_token, [rid], 201.0, "x")
        assert queries.held_leases(conn, [(first.id, first.lease_token)]) == set()
        row = queries.message_by_queue_id(conn, qid)
        assert row is not None
        assert (row.state, row.lease_owner) == ("delivering", "new")
        kinds = [e.kind for e in queries.events_of(conn, qid)]
    assert kinds == ["claim", "recovered", "claim"]
    with engine.begin() as conn:
        assert queries.renew_leases(conn, "new", [second.id], 500.0) == {second.id}
        pair = (second.id, second.lease_token)
        assert queries.held_leases(conn, [pair]) == {second.id}
        outcome = {
            "message_id": second.id, "token": second.lease_token, "queue_id": qid,
            "event": "delivered", "code": 0, "detail": "ok", "state": "delivered",
            "attempts": 1, "next_attempt_at": 1.0, "delivered_at": 202.0,
        }  # fmt: skip
        stale = {**outcome, "token": first.lease_token, "detail": "late"}
        sent = [(second.id, second.lease_token, rid, "ok")]
        stale_sent = [(first.id, first.lease_token, rid, "late")]
        held = queries.record_outcomes(conn, 202.0, [outcome, stale], sent + stale_sent)
        assert held == {(second.id, second.lease_token)}
    with engine.begin() as conn:
        row = queries.message_by_queue_id(conn, qid)
        assert row is not None
        assert (row.state, row.delivered_at, row.lease_owner) == ("delivered", 202.0, None)
        [rcpt] = queries.recipients_of(conn, row.id)
        assert (rcpt.sent_at, rcpt.last_result) == (202.0, "ok")  # the stale row was not written
        events = queries.events_of(conn, qid)
        assert [(e.kind, e.detail) for e in events][-1] == ("delivered", "ok")
        assert len(events) == 4


def test_recovery_counts_the_attempt_and_leaves_the_row_due(engine: Engine) -> None:
    qid = _add(engine)
    _claim(engine, "gone", now=100.0)
    with engine.begin() as conn:
        assert queries.recover_expired(conn, 159.0) == []
        [row] = queries.recover_expired(conn, 161.0)
        assert row.lease_owner == "gone"
        msg = queries.message_by_queue_id(conn, qid)
        assert msg is not None
        assert (msg.state, msg.attempts, msg.lease_expires_at) == ("received", 1, None)
        assert msg.next_attempt_at <= 161.0


def test_next_due_at_sees_retries_and_leases(engine: Engine) -> None:
    with engine.begin() as conn:
        assert queries.next_due_at(conn) is None
    _add(engine, due=500.0)
    _add(engine, due=50.0)
    _claim(engine, "a", now=100.0)  # takes the one due at 50; lease ends at 160
    with engine.begin() as conn:
        assert queries.next_due_at(conn) == 160.0


def test_concurrent_claims_never_hand_out_a_row_twice(engine: Engine) -> None:
    for _ in range(200):
        _add(engine)
    got: dict[str, list[str]] = {}

    def worker(name: str) -> None:
        mine: list[str] = []
        while True:
            batch = _claim(engine, name, now=100.0, limit=3)
            if not batch:
                break
            mine += batch
        got[name] = mine

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [q for batch in got.values() for q in batch]
    assert len(everything) == 200
    assert len(set(everything)) == 200


def test_claim_compiles_to_skip_locked_on_postgresql() -> None:
    stmt = queries.claim_stmt("owner", 1.0, 60, 5)
    pg = str(stmt.compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE SKIP LOCKED" in pg
    assert "RETURNING" in pg
    lite = str(stmt.compile(dialect=sqlite.dialect()))
    assert "FOR UPDATE" not in lite
    assert "RETURNING" in lite


@pytest.mark.sqlite_only("SQLite's change counter; PostgreSQL deliverers LISTEN (test_daemon)")
def test_data_version_moves_when_another_connection_commits(engine: Engine) -> None:
    with engine.connect() as watch:
        with watch.begin():
            before = queries.data_version(watch)
        with watch.begin():
            assert queries.data_version(watch) == before
        _add(engine)
        with watch.begin():
            assert queries.data_version(watch) != before
