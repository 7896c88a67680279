"""Finding 2 (retention) of the hardening review: nothing ran ``queue purge`` and the
envelope log grew forever. The deliverer now drops the bodies of delivered mail after
``keepbodies`` and deletes events after ``keepevents`` -- never a waiting message's,
never a body that is still to be delivered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from smapq.store import queries
from tests.deliver.kit import Queue, StandIn, make_queue, standin, stop, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

DAY = 86400.0


def age(q: Queue, qid: str, days: float) -> None:
    """Pretend a delivered message was delivered ``days`` ago, its events as old."""
    then = time.time() - days * DAY
    q.spool.execute(
        "UPDATE messages SET delivered_at = :t, received_at = :t WHERE queue_id = :qid",
        t=then,
        qid=qid,
    )
    q.spool.execute("UPDATE events SET at = :t WHERE queue_id = :qid", t=then, qid=qid)


def old_event(q: Queue, qid: str, days: float) -> None:
    with q.engine.begin() as conn:
        queries.add_event(conn, "note", queue_id=qid, at=time.time() - days * DAY)


def body(q: Queue, qid: str) -> bytes | None:
    row = q.row(qid)
    return None if row.body is None else bytes(row.body)


def test_once_drops_old_delivered_bodies_and_old_events_only(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: keepbodies 7d\nsmapd: keepevents 30d\n")
    old, recent = q.add(["a@x.example"]), q.add(["b@x.example"])
    assert q.deliver().returncode == 0
    age(q, old, 8)
    age(q, recent, 6)
    waiting = q.add(["exit75@x.example"])  # deferred: waits, its events must stay
    q.make_due(waiting)
    q.deliver()
    old_event(q, waiting, 60)
    old_event(q, None, 60)  # a session event, long past
    before = q.spool.scalar("SELECT count(*) FROM events")
    q.deliver()
    assert body(q, old) is None and q.row(old).state == "delivered"
    assert body(q, recent) is not None
    assert body(q, waiting) is not None
    assert "purged" in q.events(old)
    left = q.spool.scalar("SELECT count(*) FROM events WHERE at < :t", t=time.time() - 30 * DAY)
    after = q.spool.scalar("SELECT count(*) FROM events")
    assert left == 1  # the waiting message's old event, and nothing else that old
    assert "note" in q.events(waiting)
    assert after < before + 2  # the session event went (+1 purged, +claim/deferred)


def test_zero_keeps_everything(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: keepbodies 0\nsmapd: keepevents 0\n")
    qid = q.add(["a@x.example"])
    assert q.deliver().returncode == 0
    age(q, qid, 3650)
    q.deliver()
    assert body(q, qid) is not None
    assert q.events(qid) == ["claim", "delivered"]


def test_the_daemon_runs_retention_by_itself(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: keepbodies 1d\nsmapd: wakeup 3600\n")
    ids = [q.add([f"r{i}@x.example"]) for i in range(3)]
    assert q.deliver().returncode == 0
    for qid in ids:
        age(q, qid, 2)
    daemon = q.start_daemon()
    try:
        wait_for(lambda: all(body(q, qid) is None for qid in ids), what="bodies dropped")
    finally:
        code, log = stop(daemon)
    assert code == 0, log
    assert "retention: 3 delivered bodies dropped" in log
