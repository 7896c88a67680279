"""Held mail does not age: ``maxqueuetime`` counts time in the queue minus time on hold.

The reviewer's report: a message released after a hold longer than ``maxqueuetime``
went ``bad`` on its first temporary failure, because its age was counted from
``received_at``. Postfix documents that mail "on hold" does not expire while held;
smapq applies that exactly: the give-up deadline moves by the time spent held (from
the ``held`` / ``released`` events the queue verbs write), so after a release the
message has the rest of its lifetime, neither a fresh one nor none.

Days cannot pass in a test: the real verbs hold and release, then the test moves the
timestamps back, as ``make_due`` does for retries.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from smapq.errors import EX_TEMPFAIL
from tests.deliver.kit import Queue, StandIn, make_queue, standin

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

DAY = 86400.0
LIFE = 5 * DAY  # the default maxqueuetime


@pytest.fixture
def q(tmp_path: Path, standin: StandIn) -> Queue:
    return make_queue(tmp_path, str(standin.path))


def hold_and_release(q: Queue, qid: str, held_from: float, held_until: float) -> None:
    """``smapq queue hold`` then ``release``, dated back to [held_from, held_until)."""
    assert q.spool.smapq("queue", "hold", qid).returncode == 0
    assert q.spool.smapq("queue", "release", qid).returncode == 0
    for kind, at in (("held", held_from), ("released", held_until)):
        q.spool.execute(
            "UPDATE events SET at = :at WHERE queue_id = :qid AND kind = :kind",
            at=at,
            qid=qid,
            kind=kind,
        )


def test_a_message_held_past_maxqueuetime_is_deferred_not_bad(q: Queue) -> None:
    now = time.time()
    # Received 7 days ago, 1 day in the queue, then 6 days on hold, released now:
    # it has been waiting for delivery 1 day of its 5.
    qid = q.add(["exit75@x.example"], received_at=now - 7 * DAY)
    hold_and_release(q, qid, now - 6 * DAY, now)
    assert q.deliver().returncode == EX_TEMPFAIL
    row = q.row(qid)
    assert (row.state, row.attempts) == ("received", 1)
    assert row.next_attempt_at < now + DAY  # an ordinary backoff, not the deadline
    assert q.events(qid) == ["held", "released", "claim", "deferred"]


def test_held_time_moves_the_deadline_but_does_not_restart_it(q: Queue) -> None:
    now = time.time()
    # 7 days old, 1.5 of them held: 5.5 days waiting, past the 5-day lifetime.
    qid = q.add(["exit75@x.example"], received_at=now - 7 * DAY)
    hold_and_release(q, qid, now - 6 * DAY, now - 4.5 * DAY)
    assert q.deliver().returncode == 1
    row = q.row(qid)
    assert row.state == "bad"
    assert row.last_result.startswith("gave up after 1 attempts in 604")
    assert f"({int(1.5 * DAY)}s of it held)" in row.last_result
    # The last try lands on the moved deadline: 0.5 days before it, the next try is
    # capped there (received_at + held + maxqueuetime), not backoff-late.
    late = q.add(["exit75@x.example"], received_at=now - 6 * DAY)
    hold_and_release(q, late, now - 5.5 * DAY, now - 4 * DAY)  # 1.5 days held
    q.deliver()
    row = q.row(late)
    assert row.state == "received"
    deadline = row.received_at + 1.5 * DAY + LIFE
    assert row.next_attempt_at == pytest.approx(min(deadline, row.updated_at + 300), abs=1)


def test_several_holds_add_up(q: Queue) -> None:
    now = time.time()
    qid = q.add(["exit75@x.example"], received_at=now - 7 * DAY)
    hold_and_release(q, qid, now - 6 * DAY, now - 5 * DAY)
    # A second hold, ended by requeue (which also takes a message out of hold).
    assert q.spool.smapq("queue", "hold", qid).returncode == 0
    assert q.spool.smapq("queue", "requeue", qid).returncode == 0
    q.spool.execute(
        "UPDATE events SET at = :at WHERE queue_id = :qid AND kind = 'held' AND at > :after",
        at=now - 3 * DAY,
        qid=qid,
        after=now - DAY,
    )
    # 7 days old, 1 + 3 held: 3 days waiting.
    assert q.deliver().returncode == EX_TEMPFAIL
    assert q.row(qid).state == "received"
