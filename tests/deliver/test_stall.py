"""A deliverer stopped (SIGSTOP) past its leases, then continued: nothing is left behind.

The reviewer's report: after its leases expired while it was stopped, ``deliver
--once`` recovered and re-claimed its own rows, lost track of them, and exited with
them still ``delivering``; they waited out another lease and each recovery counted
an attempt. Rule now: a deliverer never exits holding a row in ``delivering``, and
it does not take back rows whose sendmails it is still running.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from smapq.errors import EX_TEMPFAIL
from smapq.store import queries
from smapq.store.engine import make_engine
from tests.conftest import program
from tests.deliver.kit import Queue, StandIn, make_queue, peek_log, standin, stop, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("backend")]

# The shortest lease the table allows; wakeup 3600 so no periodic scan interferes.
SHORT = "smapd: lease 5\nsmapd: wakeup 3600\n"


def leases_expired(q: Queue, *qids: str) -> bool:
    rows = [q.row(qid) for qid in qids]
    return all(
        r.state == "delivering"
        and r.lease_expires_at is not None
        and r.lease_expires_at < time.time()
        for r in rows
    )


def start_once(q: Queue) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [program("smapq"), "-t", str(q.spool.table), "deliver", "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_lock_free(q: Queue) -> bool:
    """Whether no other connection is inside a transaction on the queue."""
    if q.spool.database:
        busy = q.spool.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND xact_start IS NOT NULL AND pid <> pg_backend_pid()"
        )
        return bool(busy == 0)
    probe = make_engine(str(q.spool.db), busy_ms=0)
    try:
        with probe.begin():  # BEGIN IMMEDIATE: fails at once if a writer holds the lock
            return True
    except OperationalError:
        return False
    finally:
        probe.dispose()


def stall_past_leases(q: Queue, proc: subprocess.Popen[str], *qids: str) -> None:
    # Stopped inside a transaction it would hold the write lock (and block the test's
    # own writes) all along: try again until it stops outside one.
    def stopped_between_transactions() -> bool:
        proc.send_signal(signal.SIGSTOP)
        if write_lock_free(q):
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    wait_for(stopped_between_transactions, what="a stop between transactions")
    wait_for(lambda: leases_expired(q, *qids), what="the leases to expire while stopped")


def test_once_stopped_past_its_leases_finishes_its_own_rows(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), SHORT)
    ids = [q.add([f"m{n}@x.example"]) for n in range(2)]
    standin.hold("m0")
    standin.hold("m1")
    proc = start_once(q)
    try:
        wait_for(lambda: len(standin.calls()) == 2, what="both sendmails running")
        stall_past_leases(q, proc, *ids)
        # One finishes while the deliverer is stopped: on SIGCONT its freed slot makes
        # the deliverer poll the queue while the other sendmail still runs under an
        # expired lease (the reviewer's case: it recovered and re-claimed that row).
        standin.release("m0")
        wait_for(lambda: any(c.ended for c in standin.calls()), what="the first sendmail done")
    finally:
        proc.send_signal(signal.SIGCONT)
        standin.release("m0")
    wait_for(lambda: q.row(ids[0]).state == "delivered", what="the first outcome")
    standin.release("m1")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for qid in ids:
        row = q.row(qid)
        assert (row.state, row.attempts, row.lease_owner) == ("delivered", 1, None)
        # Its own rows were renewed, not recovered and handed out a second time.
        assert q.events(qid) == ["claim", "delivered"]
    assert len(standin.calls()) == 2


def test_once_whose_rows_were_recovered_meanwhile_leaves_none_delivering(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), SHORT)
    ids = [q.add([f"m{n}@x.example"]) for n in range(2)]
    standin.hold()
    proc = start_once(q)
    try:
        wait_for(lambda: len(standin.calls()) == 2, what="both sendmails running")
        stall_past_leases(q, proc, *ids)
        # What another deliverer's poll does: take the expired rows back.
        with q.engine.begin() as conn:
            assert len(queries.recover_expired(conn, time.time())) == 2
    finally:
        proc.send_signal(signal.SIGCONT)
        standin.release()
    _, err = proc.communicate(timeout=120)
    # The stale outcomes were fenced off ("lost their lease"). A recovered row is due
    # from the moment of its recovery, after this run began: --once takes each message
    # at most once per run, so it is left, received, for the next run.
    assert proc.returncode == EX_TEMPFAIL, err
    assert "2 lost their lease, 0 delivered" in err, err
    assert q.states() == {"received": 2}
    for qid in ids:
        assert q.events(qid) == ["claim", "recovered"]
        assert q.row(qid).attempts == 1  # the recovery counted
    assert q.deliver().returncode == 0
    assert q.states() == {"delivered": 2}
    assert len(standin.calls()) == 4  # at-least-once: the recovery re-sent them


def test_daemon_stopped_past_its_leases_releases_them_on_the_second_sigterm(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), SHORT)
    standin.hold()
    daemon = q.start_daemon()
    qid = q.add(["a@x.example"])
    try:
        try:
            wait_for(standin.calls, what="sendmail started")
            stall_past_leases(q, daemon, qid)
        finally:
            daemon.send_signal(signal.SIGCONT)
        # Continued: the row is still its own (renewed), not recovered behind its back.
        wait_for(lambda: q.row(qid).lease_expires_at > time.time(), what="the lease renewed")
        daemon.send_signal(signal.SIGTERM)
        wait_for(lambda: "signal again to abort" in peek_log(daemon), what="first stop seen")
    finally:
        code, err = stop(daemon)  # never leave the daemon behind, even on a failure
    standin.release()
    assert code == 0, err
    row = q.row(qid)
    assert (row.state, row.attempts, row.lease_owner) == ("received", 0, None)
    assert row.next_attempt_at <= time.time()  # due now
    assert q.events(qid) == ["claim", "recovered"]
    assert len(standin.calls()) == 1
