"""``smapq deliver --once`` against the real stand-in sendmail: argv, stdin, outcomes."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from smapq.errors import EX_TEMPFAIL
from tests.conftest import program
from tests.deliver.kit import Queue, StandIn, make_queue, standin, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]


@pytest.fixture
def q(tmp_path: Path, standin: StandIn) -> Queue:
    return make_queue(tmp_path, str(standin.path))


def test_argv_is_oi_f_sender_dashdash_recipients(q: Queue, standin: StandIn) -> None:
    qid = q.add(["a@x.example", "b@y.example"], sender="s@example.org")
    proc = q.deliver()
    assert proc.returncode == 0, proc.stderr
    [call] = standin.calls()
    assert call.argv == ["-oi", "-f", "s@example.org", "--", "a@x.example", "b@y.example"]
    row = q.row(qid)
    assert row.state == "delivered"
    assert row.attempts == 1
    assert row.last_exit == 0
    assert row.lease_owner is None
    assert all(r.sent_at is not None for r in q.recipients(qid))
    assert q.events(qid) == ["claim", "delivered"]


def test_null_sender_is_passed_as_angle_brackets(q: Queue, standin: StandIn) -> None:
    q.add(["a@x.example"], sender="")
    assert q.deliver().returncode == 0
    assert standin.calls()[0].argv[:4] == ["-oi", "-f", "<>", "--"]


BODIES = {
    "dot": b"Subject: dots\n\n.\nafter the dot\n",
    "dotdot": b"Subject: dots\n\n..\n.\n...\n",
    "eightbit": "Subject: 8bit\n\nGr\u00fc\u00dfe, \u00e9t\u00e9, \u65e5\u672c\n".encode(),
    "binaryish": bytes(range(1, 256)) * 4,
    "longlines": b"Subject: long\n\n" + b"x" * 998 + b"\n" + b"y" * 998 + b"\r\n",
    "crlf": b"Subject: crlf\r\n\r\nline\r\n.\r\n",
    "no-final-newline": b"Subject: open\n\nno newline at the end",
    "empty": b"",
    "big": b"Subject: big\n\n" + (b"0123456789" * 99 + b"\n") * 3000,
}


def test_body_corpus_reaches_sendmail_byte_exact(q: Queue, standin: StandIn) -> None:
    trace = "Received: from client.example ([192.0.2.1])\n\tby mx.example via smapq; id X\n"
    sent = {}
    for name, body in BODIES.items():
        sent[name] = trace.encode() + body
        q.add([f"{name}@x.example"], body=body, trace=trace)
    q.add(["notrace@x.example"], body=b"no trace\n")
    proc = q.deliver()
    assert proc.returncode == 0, proc.stderr
    got = {c.recipients[0].split("@")[0]: c.stdin for c in standin.calls()}
    assert got.pop("notrace") == b"no trace\n"
    assert got == sent


# (recipient, state after one --once run with the default retrycodes 71,74,75)
MATRIX = [
    ("exit0", "delivered"),
    ("exit64", "bad"),
    ("exit65", "bad"),
    ("exit67", "bad"),
    ("exit69", "bad"),
    ("exit70", "bad"),
    ("exit71", "received"),
    ("exit72", "bad"),
    ("exit73", "bad"),
    ("exit74", "received"),
    ("exit75", "received"),
    ("exit76", "bad"),
    ("exit77", "bad"),
    ("exit78", "bad"),
    ("exit1", "bad"),
    ("exit255", "bad"),
    ("signal9", "received"),
    ("signal15", "received"),
    ("signal11", "received"),
]


def test_full_exit_code_matrix(q: Queue, standin: StandIn) -> None:
    ids = {local: q.add([f"{local}@x.example"]) for local, _ in MATRIX}
    proc = q.deliver()
    assert proc.returncode == 1  # something went bad
    for local, expected in MATRIX:
        row = q.row(ids[local])
        assert row.state == expected, (local, row.last_result)
        assert row.attempts == 1
        if expected == "received":
            assert row.next_attempt_at > row.updated_at
            assert q.events(ids[local]) == ["claim", "deferred"]
        if local.startswith("exit") and local != "exit0":
            assert row.last_exit == int(local[4:])
        if local.startswith("signal"):
            assert "killed by signal" in row.last_result
    assert len(standin.calls()) == len(MATRIX)


def test_retrycodes_from_the_table(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: retrycodes 67,69\n")
    soft = q.add(["exit67@x.example"])
    hard = q.add(["exit75@x.example"])
    q.deliver()
    assert q.row(soft).state == "received"
    assert q.row(hard).state == "bad"


def test_once_exit_status_says_what_happened(q: Queue, standin: StandIn) -> None:
    assert q.deliver().returncode == 0  # nothing due is success
    q.add(["ok@x.example"])
    assert q.deliver().returncode == 0
    q.add(["exit75@x.example"])
    proc = q.deliver()
    assert proc.returncode == EX_TEMPFAIL
    assert "1 deferred" in proc.stderr


def test_deferred_message_is_not_retried_before_its_time(q: Queue, standin: StandIn) -> None:
    qid = q.add(["exit75@x.example"])
    q.deliver()
    q.deliver()
    assert len(standin.calls()) == 1
    q.make_due(qid)
    q.deliver()
    assert len(standin.calls()) == 2
    assert q.row(qid).attempts == 2


def test_backoff_schedule_doubles_up_to_the_cap(tmp_path: Path, standin: StandIn) -> None:
    extra = "smapd: minbackoff 60\nsmapd: maxbackoff 300\n"
    q = make_queue(tmp_path, str(standin.path), extra)
    qid = q.add(["exit75@x.example"])
    delays = []
    for _ in range(5):
        q.make_due(qid)
        q.deliver()
        row = q.row(qid)
        delays.append(round(row.next_attempt_at - row.updated_at))
    assert delays == [60, 120, 240, 300, 300]
    assert q.row(qid).attempts == 5


def test_gives_up_after_maxqueuetime_and_exports_to_baddir(q: Queue, standin: StandIn) -> None:
    old = time.time() - 6 * 86400
    qid = q.add(["exit75@x.example"], received_at=old, trace="Received: by test\n")
    proc = q.deliver()
    assert proc.returncode == 1
    row = q.row(qid)
    assert row.state == "bad"
    assert row.last_result.startswith("gave up after 1 attempts")
    assert (q.spool.baddir / f"{qid}.eml").exists()


def test_bad_message_is_exported_to_baddir(q: Queue, standin: StandIn) -> None:
    body = b"Subject: bounce me\n\n.\nbody\n"
    trace = "Received: from c by mx\n"
    qid = q.add(["exit67@x.example", "other@y.example"], body=body, trace=trace, sender="")
    q.deliver()
    eml = q.spool.baddir / f"{qid}.eml"
    env = q.spool.baddir / f"{qid}.envelope"
    assert eml.read_bytes() == trace.encode() + body
    assert stat.S_IMODE(eml.stat().st_mode) == 0o600
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    lines = env.read_text().splitlines()
    assert lines[:4] == [f"QUEUEID {qid}", "FROM <>", "RCPT <exit67@x.example>",
                         "RCPT <other@y.example>"]  # fmt: skip
    assert lines[-1].startswith("REASON exit 67 (EX_NOUSER)")
    assert q.row(qid).state == "bad"
    assert q.events(qid) == ["claim", "bad", "exported"]
    assert not [p for p in os.listdir(q.spool.baddir) if p.startswith(".")]


@pytest.mark.parametrize(
    ("rcpts", "sender"),
    [
        (["ok@x.example", "-oQ/tmp/evil"], "s@example.org"),
        (["ok@x.example"], "-fevil@example.org"),
        (["ok@x.example"], "<-oQ/tmp>"),
    ],
)
def test_dash_addresses_never_reach_argv(
    q: Queue, standin: StandIn, rcpts: list[str], sender: str
) -> None:
    qid = q.add(rcpts, sender=sender)
    assert q.deliver().returncode == 1
    assert standin.calls() == []
    row = q.row(qid)
    assert row.state == "bad"
    assert "starts with '-'" in row.last_result
    assert (q.spool.baddir / f"{qid}.eml").exists()


def test_batches_and_per_recipient_bookkeeping(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: maxrcptbatch 2\n")
    rcpts = ["r1@x", "r2@x", "r3@x", "failonce@x", "r5@x"]
    qid = q.add(rcpts)
    q.deliver()
    assert [c.recipients for c in standin.calls()] == [["r1@x", "r2@x"], ["r3@x", "failonce@x"]]
    row = q.row(qid)
    assert row.state == "received"
    sent = {r.address: r.sent_at is not None for r in q.recipients(qid)}
    assert sent == {"r1@x": True, "r2@x": True, "r3@x": False, "failonce@x": False,
                    "r5@x": False}  # fmt: skip
    q.make_due(qid)
    q.deliver()
    # The retry never re-sends the batch that succeeded.
    assert [c.recipients for c in standin.calls()[2:]] == [["r3@x", "failonce@x"], ["r5@x"]]
    assert q.row(qid).state == "delivered"
    assert all(r.sent_at is not None for r in q.recipients(qid))


def test_missing_sendmail_defers_with_a_clear_reason(tmp_path: Path) -> None:
    q = make_queue(tmp_path, "/nonexistent/sendmail")
    qid = q.add(["a@x.example"])
    proc = q.deliver()
    assert proc.returncode == EX_TEMPFAIL
    row = q.row(qid)
    assert row.state == "received"
    assert row.attempts == 1
    assert row.last_result.startswith("sendmail program /nonexistent/sendmail does not exist")


def test_non_executable_sendmail_defers(tmp_path: Path, standin: StandIn) -> None:
    standin.path.chmod(0o644)
    q = make_queue(tmp_path, str(standin.path))
    qid = q.add(["a@x.example"])
    assert q.deliver().returncode == EX_TEMPFAIL
    assert "is not executable" in q.row(qid).last_result


def test_bad_interpreter_defers(tmp_path: Path, standin: StandIn) -> None:
    standin.path.write_text("#!/nonexistent/python\n")
    q = make_queue(tmp_path, str(standin.path))
    qid = q.add(["a@x.example"])
    assert q.deliver().returncode == EX_TEMPFAIL
    assert q.row(qid).last_result.startswith(f"cannot execute {standin.path}")


def test_timeout_kills_the_process_group_and_defers(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: sendmailtimeout 1\n")
    standin.hold()
    qid = q.add(["slow@x.example"])
    proc = q.deliver()
    standin.release()
    assert proc.returncode == EX_TEMPFAIL
    row = q.row(qid)
    assert row.state == "received"
    assert row.last_result.startswith("timed out, killed")
    [call] = standin.calls()
    with pytest.raises(ProcessLookupError):
        os.kill(call.pid, 0)


def test_output_is_captured_and_bounded(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: outputmax 1k\n")
    qid = q.add(["talk@x.example", "exit75@x.example"])
    q.deliver()
    result = q.row(qid).last_result
    assert result.startswith("exit 75 (EX_TEMPFAIL): xxxx")
    assert len(result) < 1024 + 100


def test_expired_lease_is_recovered_and_delivered(q: Queue, standin: StandIn) -> None:
    qid = q.add(["a@x.example"])
    q.spool.execute(
        "UPDATE messages SET state='delivering', lease_owner='dead:1:x', "
        "lease_expires_at=1, lease_token=7 WHERE queue_id=:qid",
        qid=qid,
    )
    assert q.deliver().returncode == 0
    row = q.row(qid)
    assert row.state == "delivered"
    assert row.lease_token == 8
    assert q.events(qid) == ["recovered", "claim", "delivered"]


def test_held_messages_are_never_claimed(q: Queue, standin: StandIn) -> None:
    qid = q.add(["a@x.example"])
    q.spool.execute("UPDATE messages SET state='held' WHERE queue_id=:qid", qid=qid)
    assert q.deliver().returncode == 0
    assert standin.calls() == []
    assert q.row(qid).state == "held"


def test_maxchildren_sendmails_run_at_once(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: maxchildren 4\n")
    standin.hold()
    for i in range(4):
        q.add([f"m{i}@x.example"])
    proc = subprocess.Popen(
        [program("smapq"), "-t", str(q.spool.table), "deliver", "--once"],
        stderr=subprocess.PIPE,
    )
    # Held stand-ins cannot finish, so four calls on record means four at once.
    wait_for(lambda: len(standin.calls()) == 4, what="4 concurrent sendmails")
    standin.release()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert q.states() == {"delivered": 4}


def test_maxchildren_is_an_upper_bound(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: maxchildren 2\n")
    for i in range(8):
        q.add([f"m{i}@x.example"])
    assert q.deliver().returncode == 0
    assert len(standin.calls()) == 8
    assert standin.max_overlap() <= 2


def test_deliver_needs_a_mode(q: Queue) -> None:
    proc = q.spool.smapq("deliver", check=False)
    assert proc.returncode == 64
    assert "--once or --daemon" in proc.stderr


@pytest.mark.sqlite_only("a missing database file")
def test_missing_queue_database_is_an_error_not_a_new_file(q: Queue) -> None:
    q.spool.db.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(q.spool.db) + suffix).unlink(missing_ok=True)
    proc = q.deliver()
    assert proc.returncode == 1
    assert "does not exist: run 'smapq init'" in proc.stderr
    assert not q.spool.db.exists()


def test_once_takes_each_due_message_at_most_once(tmp_path: Path, standin: StandIn) -> None:
    """Finding 5 of the hardening review: with a short backoff and a sendmail that hangs
    until killed, one --once run tried one message 7 times and took 102 s for 5."""
    q = make_queue(
        tmp_path,
        str(standin.path),
        "smapd: minbackoff 1\nsmapd: sendmailtimeout 1\nsmapd: maxchildren 1\n",
    )
    standin.hold()
    ids = [q.add([f"r{i}@x.example"]) for i in range(5)]
    proc = q.deliver()
    assert proc.returncode == EX_TEMPFAIL, proc.stderr
    calls = standin.calls()
    assert sorted(c.recipients[0] for c in calls) == [f"r{i}@x.example" for i in range(5)]
    for qid in ids:
        row = q.row(qid)
        assert (row.state, row.attempts) == ("received", 1)
    # Due again a second later: the next run takes each of them once more.
    time.sleep(1.1)
    q.deliver()
    assert len(standin.calls()) == 10
