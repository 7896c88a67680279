"""Sender notices through the real deliverer and the stand-in sendmail.

Every notice is read back the way a mail client would: the stand-in records the
notice's argv and stdin, and Python's email package parses the multipart/report, the
message/delivery-status fields (per message and per recipient) and the returned
headers.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import json
import sqlite3
import time
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest

from smapq.store import queries
from tests.deliver.kit import Call, Queue, StandIn, make_queue, peek_log, standin, stop, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

HOST = "mx.test.example"
BOUNCE = f"smap: hostname {HOST}\nsmapd: bounce on\n"
TRACE = "Received: from client.example (unknown [192.0.2.1])\r\n\tby mx via smap; id X\r\n"
BODY = (
    b"From: Sender <s@example.org>\r\nSubject: quarterly figures\r\n"
    b"Message-ID: <m1@example.org>\r\n\r\nthe secret body\r\n"
)


def notices(q: Queue) -> list[Any]:
    """The notices smapd queued (from the null sender, made here), oldest first."""
    with q.engine.begin() as conn:
        return list(
            conn.exec_driver_sql(
                "SELECT queue_id, state, protocol FROM messages "
                "WHERE mail_from = '' AND protocol = 'DSN' ORDER BY id"
            )
        )


def parse(call: Call) -> EmailMessage:
    msg = email.message_from_bytes(call.stdin, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def report_fields(msg: EmailMessage) -> tuple[Message, list[Message]]:
    """The per-message block and the per-recipient blocks of the delivery-status part."""
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return blocks[0], blocks[1:]


def when(field: str | None) -> float:
    assert field is not None
    return email.utils.parsedate_to_datetime(field).timestamp()


def test_permanent_failure_bounces_the_failed_recipients_to_the_sender(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: maxrcptbatch 2\n")
    arrived = time.time() - 60
    qid = q.add(
        ["r1@x.example", "r2@x.example", "exit67@y.example"],
        body=BODY,
        trace=TRACE,
        sender="s@example.org",
        received_at=arrived,
    )
    assert q.deliver().returncode == 1
    assert q.row(qid).state == "bad"
    [notice] = notices(q)
    assert (notice.state, notice.protocol) == ("received", "DSN")
    assert q.events(qid) == ["claim", "bad", "bounced", "exported"]
    assert q.events(notice.queue_id) == ["dsn"]

    proc = q.deliver()  # the notice is mail like any other: the next run sends it
    assert proc.returncode == 0, proc.stderr
    calls = standin.calls()
    assert [c.recipients for c in calls] == [
        ["r1@x.example", "r2@x.example"],
        ["exit67@y.example"],
        ["s@example.org"],
    ]
    assert calls[2].argv == ["-oi", "-f", "<>", "--", "s@example.org"]
    assert q.row(notice.queue_id).state == "delivered"

    msg = parse(calls[2])
    assert msg["Received"].startswith(f"by {HOST} via smapd")
    assert msg["From"].addresses[0].addr_spec == f"postmaster@{HOST}"
    assert msg["To"].addresses[0].addr_spec == "s@example.org"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    text, _, headers = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "exit67@y.example" in text.get_content()
    assert "r1@x.example" not in text.get_content()

    per_message, per_recipient = report_fields(msg)
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Smapq-Queue-ID"] == qid
    assert abs(when(per_message["Arrival-Date"]) - arrived) < 1
    [failed] = per_recipient  # r1 and r2 were accepted by the first batch
    assert failed["Final-Recipient"] == "rfc822; exit67@y.example"
    assert failed["Action"] == "failed"
    assert failed["Status"] == "5.1.1"  # EX_NOUSER
    assert failed["Diagnostic-Code"].startswith("x-unix; exit 67 (EX_NOUSER)")
    assert abs(when(failed["Last-Attempt-Date"]) - q.row(qid).updated_at) < 1
    assert failed["Will-Retry-Until"] is None

    # The original's header block with its trace, never its body.
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert returned.startswith(TRACE.encode())
    assert b"Subject: quarterly figures" in returned and b"<m1@example.org>" in returned
    assert b"secret body" not in calls[2].stdin

    summary = json.loads(q.spool.smapq("report", "summary", "--format", "json").stdout)
    values = {r["metric"]: r["value"] for r in summary["rows"]}
    assert values["bounces_in_window"] == 1 and values["warnings_in_window"] == 0
    metrics = q.spool.smapq("report", "metrics").stdout.splitlines()
    assert "smapq_bounces_total 1" in metrics and "smapq_delay_warnings_total 0" in metrics
    daily = q.spool.smapq("report", "daily").stdout
    [line] = [ln for ln in daily.splitlines() if ln.strip().startswith("bounced:")]
    assert line.split(":", 1)[1].split() == ["1", "failure", "notice,", "0", "delay", "warnings"]


def test_failures_committed_together_each_bounce_to_their_own_sender(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE)
    sent = {q.add([f"exit67@{n}.example"], sender=f"s{n}@example.org"): n for n in range(5)}
    q.deliver()
    assert len(notices(q)) == 5
    q.deliver()
    told = {}
    for call in standin.calls()[5:]:
        per_message, [failed] = report_fields(parse(call))
        qid = per_message["X-Smapq-Queue-ID"]
        told[qid] = (call.recipients, failed["Final-Recipient"])
    assert told == {
        qid: ([f"s{n}@example.org"], f"rfc822; exit67@{n}.example") for qid, n in sent.items()
    }


def test_maxqueuetime_bounces_with_delivery_time_expired(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE)
    qid = q.add(["exit75@x.example"], body=BODY, received_at=time.time() - 6 * 86400)
    assert q.deliver().returncode == 1
    assert q.row(qid).state == "bad"
    assert "bounced" in q.events(qid)
    q.deliver()
    msg = parse(standin.calls()[-1])
    _, [failed] = report_fields(msg)
    assert failed["Action"] == "failed"
    assert failed["Status"] == "4.4.7"  # RFC 3463: delivery time expired
    assert failed["Diagnostic-Code"].startswith("x-unix; gave up after 1 attempts")
    assert "exit 75 (EX_TEMPFAIL)" in failed["Diagnostic-Code"]


def test_null_sender_is_never_bounced(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE)
    qid = q.add(["exit67@x.example"], sender="")
    proc = q.deliver()
    assert proc.returncode == 1
    assert q.row(qid).state == "bad"
    assert notices(q) == []
    assert "bounced" not in q.events(qid)
    assert f"{qid}: from=<>: not bounced (null sender)" in proc.stderr
    q.deliver()
    assert len(standin.calls()) == 1


def test_a_bounce_that_fails_is_not_bounced(tmp_path: Path, standin: StandIn) -> None:
    # The stand-in fails every run that names exit67@..., the sender's too: the
    # original goes bad, and so does its bounce to that sender.
    q = make_queue(tmp_path, str(standin.path), BOUNCE)
    qid = q.add(["bob@x.example"], sender="exit67@example.org")
    q.deliver()
    [notice] = notices(q)
    q.deliver()
    assert q.row(qid).state == "bad"
    assert q.row(notice.queue_id).state == "bad"
    assert q.events(notice.queue_id) == ["dsn", "claim", "bad", "exported"]
    assert len(notices(q)) == 1  # no bounce of the bounce
    q.deliver()
    assert len(standin.calls()) == 2


def test_sender_that_cannot_be_argv_gets_no_notice(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE)
    qid = q.add(["ok@x.example"], sender="-fevil@example.org")
    proc = q.deliver()
    assert q.row(qid).state == "bad"
    assert notices(q) == []
    assert "no notice to the sender: sender '-fevil@example.org' starts with '-'" in proc.stderr


def test_delay_warning_once_after_the_age(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: delaywarning 1h\n")
    arrived = time.time() - 2 * 3600
    old = q.add(["exit75@x.example", "fine@x.example"], body=BODY, received_at=arrived)
    young = q.add(["exit75@y.example"])
    assert q.deliver().returncode == 75
    assert q.row(old).state == "received" and q.row(young).state == "received"
    [warning] = notices(q)
    assert "warned" in q.events(old) and "warned" not in q.events(young)

    q.make_due(old)
    q.deliver()  # the second deferral warns no more; the warning itself goes out
    assert len(notices(q)) == 1
    assert q.events(old).count("warned") == 1
    assert q.row(warning.queue_id).state == "delivered"

    [call] = [c for c in standin.calls() if c.argv[2] == "<>"]
    msg = parse(call)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert "THIS IS A WARNING ONLY" in next(msg.iter_parts()).get_content()
    _, entries = report_fields(msg)
    assert [e["Final-Recipient"] for e in entries] == [
        "rfc822; exit75@x.example",
        "rfc822; fine@x.example",
    ]
    for entry in entries:
        assert entry["Action"] == "delayed"
        assert entry["Status"] == "4.3.0"  # EX_TEMPFAIL
        assert abs(when(entry["Will-Retry-Until"]) - (arrived + 5 * 86400)) < 1


def test_delay_warning_counts_time_on_hold(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: delaywarning 1h\n")
    arrived = time.time() - 3 * 3600
    qid = q.add(["exit75@x.example"], received_at=arrived)
    with q.engine.begin() as conn:  # as `smapq queue hold` and `release` record it
        queries.add_event(conn, "held", at=arrived + 60, queue_id=qid)
        queries.add_event(conn, "released", at=arrived + 60 + 1800, queue_id=qid)
    q.deliver()
    assert len(notices(q)) == 1
    q.deliver()
    _, [entry] = report_fields(parse(standin.calls()[-1]))
    # Held mail does not age: the deadline moves by the half hour on hold.
    assert abs(when(entry["Will-Retry-Until"]) - (arrived + 1800 + 5 * 86400)) < 1


def test_bounce_is_off_by_default(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: delaywarning 1s\n")
    bad = q.add(["exit67@x.example"])
    late = q.add(["exit75@x.example"], received_at=time.time() - 3600)
    q.deliver()
    assert q.row(bad).state == "bad" and q.row(late).state == "received"
    assert notices(q) == []
    assert not {"bounced", "warned"} & {*q.events(bad), *q.events(late)}
    check = q.spool.smapq("check-config", check=False)
    assert "delaywarning is set but bounce is off" in check.stdout + check.stderr


def test_daemon_sends_the_bounce_without_waiting_for_a_scan(
    tmp_path: Path, standin: StandIn
) -> None:
    # Neither the scan (wakeup) nor the next lease expiry comes within the test's wait,
    # and a sendmail still running keeps the failure's outcome waiting for a group
    # commit of its own, after the pass that noticed the free worker: the notice is
    # found by change detection or by the deliverer's own kick after that commit.
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: wakeup 3600\nsmapd: lease 600\n")
    standin.hold("slow")
    daemon = q.start_daemon()
    try:
        q.add(["slow@x.example"])
        wait_for(standin.calls, what="the slow sendmail started")
        qid = q.add(["exit67@x.example"])
        wait_for(lambda: len(standin.calls()) == 3, what="the bounce sent")
    finally:
        standin.release("slow")
        code, err = stop(daemon)
    assert code == 0, err
    assert standin.calls()[2].argv[2:] == ["<>", "--", "sender@example.org"]
    assert f"{qid}: sender non-delivery notification:" in err


# --- one transaction: the message goes bad with its bounce, or neither happens ------


def test_a_failing_notice_insert_leaves_neither(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: wakeup 3600\n")
    if q.spool.database:
        sql(
            q,
            "CREATE FUNCTION no_notice() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN RAISE EXCEPTION ''no notices today''; END'",
            "CREATE TRIGGER no_notice BEFORE INSERT ON messages FOR EACH ROW"
            " WHEN (NEW.mail_from = '') EXECUTE FUNCTION no_notice()",
        )
    else:
        sql(
            q,
            "CREATE TRIGGER no_notice BEFORE INSERT ON messages WHEN NEW.mail_from = '' "
            "BEGIN SELECT RAISE(ABORT, 'no notices today'); END",
        )
    daemon = q.start_daemon()
    try:
        qid = q.add(["exit67@x.example"])
        wait_for(lambda: "no notices today" in peek_log(daemon), what="the insert failing")
        assert q.row(qid).state == "delivering"  # not bad without its bounce
        assert "bad" not in q.events(qid) and notices(q) == []
        sql(q, "DROP TRIGGER no_notice" + (" ON messages" if q.spool.database else ""))
        # The outcome waited in memory and is written with its bounce: both at once.
        wait_for(lambda: q.row(qid).state == "bad", what="the outcome written")
        assert len(notices(q)) == 1
        assert q.events(qid).count("bounced") == 1
    finally:
        stop(daemon)
    # sendmail ran once for the message: the outcome waited, it was not tried again.
    assert [c.recipients for c in standin.calls()].count(["exit67@x.example"]) == 1


def test_kill_9_inside_the_outcome_transaction_leaves_neither(
    tmp_path: Path, standin: StandIn
) -> None:
    q = make_queue(tmp_path, str(standin.path), BOUNCE + "smapd: wakeup 3600\nsmapd: lease 5\n")
    # A notice insert that takes minutes: the deliverer is caught between the
    # outcome's UPDATE and the COMMIT, with both written to its transaction.
    slow_notice_insert(q)
    daemon = q.start_daemon()
    try:
        qid = q.add(["exit67@x.example"])
        wait_for(lambda: [c for c in standin.calls() if c.ended], what="sendmail done")
        wait_for(lambda: _inside_the_outcome(q, 1.0), what="the outcome transaction open")
    finally:
        daemon.kill()
        daemon.communicate(timeout=60)
    if q.spool.database:
        # The server ends the dead client's session (here at once, not at its next
        # read from the socket), and with it the transaction.
        sql(
            q,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event = 'PgSleep'",
        )
        wait_for(lambda: not _inside_the_outcome(q, 0.0), what="the session ended")
    assert q.row(qid).state == "delivering"
    assert "bad" not in q.events(qid) and notices(q) == []

    sql(q, "DROP TRIGGER slow_notice" + (" ON messages" if q.spool.database else ""))
    sql(q, "UPDATE messages SET lease_expires_at = 0")  # no wait
    assert q.deliver().returncode == 1
    assert q.row(qid).state == "bad"
    assert len(notices(q)) == 1
    assert q.events(qid) == ["claim", "recovered", "claim", "bad", "bounced", "exported"]
    assert len(standin.calls()) == 2  # at-least-once: sendmail ran again


def slow_notice_insert(q: Queue) -> None:
    """A trigger that makes inserting a notice (a message from <>) take minutes."""
    if q.spool.database:
        sql(
            q,
            "CREATE FUNCTION slow_notice() RETURNS trigger LANGUAGE plpgsql AS"
            " 'BEGIN PERFORM pg_sleep(600); RETURN NEW; END'",
            "CREATE TRIGGER slow_notice AFTER INSERT ON messages FOR EACH ROW"
            " WHEN (NEW.mail_from = '') EXECUTE FUNCTION slow_notice()",
        )
        return
    sql(
        q,
        "CREATE TABLE slow (x INTEGER)",
        "INSERT INTO slow WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL "
        "SELECT i + 1 FROM r WHERE i < 1500) SELECT i FROM r",
        "CREATE TRIGGER slow_notice AFTER INSERT ON messages WHEN NEW.mail_from = '' "
        "BEGIN SELECT count(*) FROM slow a, slow b, slow c; END",
    )


def sql(q: Queue, *statements: str) -> None:
    with q.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def _inside_the_outcome(q: Queue, seconds: float) -> bool:
    """Whether a deliverer's transaction is held open (for ``seconds``, on SQLite) --
    on PostgreSQL: a session is sleeping in the slow trigger."""
    if q.spool.database:
        return bool(
            q.spool.scalar(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event = 'PgSleep'"
            )
        )
    return _write_locked(q, seconds)


def _write_locked(q: Queue, seconds: float) -> bool:
    """Whether some connection holds the queue's write transaction for ``seconds``."""
    deadline = time.monotonic() + seconds
    con = sqlite3.connect(q.spool.db, timeout=0, isolation_level=None)
    try:
        while time.monotonic() < deadline:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:
                time.sleep(0.05)
                continue
            con.execute("ROLLBACK")
            return False
        return True
    finally:
        con.close()
