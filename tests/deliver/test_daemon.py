"""``smapq deliver --daemon``: prompt pickup, leases across kill -9, signals, two deliverers."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import program, write_table
from tests.deliver.kit import StandIn, make_queue, peek_log, standin, stop, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("backend")]

# wakeup 3600: a message picked up within the test's lifetime was noticed by change
# detection, not by the periodic scan.
NO_SCAN = "smapd: wakeup 3600\n"


def test_new_mail_is_picked_up_without_waiting_for_a_scan(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    daemon = q.start_daemon()
    try:
        for n in range(3):
            qid = q.add([f"n{n}@x.example"])
            wait_for(lambda qid=qid: q.row(qid).state == "delivered", what="pickup")
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert len(standin.calls()) == 3


def test_sigterm_lets_running_sendmail_finish(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    standin.hold()
    daemon = q.start_daemon()
    qid = q.add(["a@x.example"])
    wait_for(standin.calls, what="sendmail started")
    daemon.send_signal(signal.SIGTERM)
    standin.release()
    _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert q.row(qid).state == "delivered"


def test_second_sigterm_kills_sendmail_and_releases_the_row(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    standin.hold()
    daemon = q.start_daemon()
    qid = q.add(["a@x.example"])
    [call] = wait_for(standin.calls, what="sendmail started")
    daemon.send_signal(signal.SIGTERM)
    wait_for(lambda: "signal again to abort" in peek_log(daemon), what="first stop seen")
    daemon.send_signal(signal.SIGTERM)
    _, err = daemon.communicate(timeout=60)
    standin.release()
    assert daemon.returncode == 0, err
    row = q.row(qid)
    assert row.state == "received"
    assert row.attempts == 0  # a shutdown is not a failed attempt
    assert row.lease_owner is None
    assert q.events(qid) == ["claim", "recovered"]
    with pytest.raises(ProcessLookupError):
        os.kill(call.pid, 0)


def test_sighup_rereads_the_table(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, "/nonexistent/sendmail", NO_SCAN)
    daemon = q.start_daemon()
    try:
        first = q.add(["a@x.example"])
        wait_for(lambda: q.row(first).state == "received" and q.row(first).attempts, what="1")
        text = q.spool.table.read_text().replace("/nonexistent/sendmail", str(standin.path))
        write_table(q.spool.table, text)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "table re-read" in peek_log(daemon), what="reload logged")
        second = q.add(["b@x.example"])
        wait_for(lambda: q.row(second).state == "delivered", what="delivery after reload")
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert [c.recipients for c in standin.calls()] == [["b@x.example"]]


def test_kill_9_during_sendmail_redelivers_after_the_lease(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), NO_SCAN + "smapd: lease 5\n")
    standin.hold()
    first = q.start_daemon()
    qid = q.add(["a@x.example"])
    wait_for(standin.calls, what="sendmail started")
    first.kill()
    first.communicate(timeout=60)
    standin.release()  # the orphaned sendmail finishes; its outcome is never recorded
    assert q.row(qid).state == "delivering"
    second = q.start_daemon()
    try:
        wait_for(lambda: q.row(qid).state == "delivered", what="redelivery after the lease")
    finally:
        code, err = stop(second)
    assert code == 0, err
    # At-least-once: the message went to sendmail twice, and the log says why.
    assert len(standin.calls()) == 2
    assert q.events(qid) == ["claim", "recovered", "claim", "delivered"]
    assert q.row(qid).attempts == 2


def test_two_deliverers_never_hand_out_a_message_twice(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), NO_SCAN + "smapd: maxchildren 3\n")
    daemons = [q.start_daemon(), q.start_daemon()]
    try:
        ids = []
        for n in range(60):
            ids.append(q.add([f"m{n}@x.example"], body=f"message {n}\n".encode()))
        wait_for(lambda: q.states() == {"delivered": 60}, what="all delivered")
    finally:
        results = [stop(d) for d in daemons]
    assert all(code == 0 for code, _ in results), results
    calls = standin.calls()
    assert len(calls) == 60
    assert len({c.stdin for c in calls}) == 60
    for qid in ids:
        assert q.events(qid) == ["claim", "delivered"]


def test_once_and_daemon_agree_on_the_table(tmp_path: Path, standin: StandIn) -> None:
    """``smapd`` is ``smapq deliver --daemon``: same table, same queue."""
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    env = {**os.environ, "SMAPQ_TABLE": str(q.spool.table), "PYTHONFAULTHANDLER": "1"}
    daemon = subprocess.Popen(
        [program("smapd")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        qid = q.add(["a@x.example"])
        wait_for(lambda: q.row(qid).state == "delivered", what="smapd delivers")
    finally:
        code, err = stop(daemon, signal.SIGINT)
    assert code == 0, err


def test_a_signal_during_start_up_is_not_fatal(tmp_path: Path, standin: StandIn) -> None:
    """SIGHUP right after the first log line (the privilege drop), before the loop
    runs: it is held pending until the loop can act on it, not the default action
    (which terminates the process)."""
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    daemon = q.start_daemon()
    try:
        wait_for(lambda: "smapd[" in peek_log(daemon), what="the first log line")
        daemon.send_signal(signal.SIGHUP)
        qid = q.add(["a@x.example"])
        wait_for(lambda: q.row(qid).state == "delivered", what="delivery after SIGHUP")
    finally:
        code, err = stop(daemon)
    assert code == 0, err
