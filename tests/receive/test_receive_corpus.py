"""Acceptance: the receiver corpus, against both transports of the intake -- the
installed ``smap`` under a real super-server and ``smapq serve`` -- on each backend
(a real database file, a fresh database on the real PostgreSQL).

Driven by Python's smtplib and by raw sockets on a loopback port.  As root (CI) the
receiver really chroots into the spool and runs as nobody; otherwise the table turns
the jail off.  ``rig`` and ``transport`` are parametrised over both transports.
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import EmailMessage

import pytest

from smapq.smtp import limits
from smapq.smtp import replies as R
from tests.conftest import Spool
from tests.receive.conftest import Rig

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

SEED = [
    (b"helo bigco.com", b"250 (bigco.com) pleased to meet you.\r\n"),
    (b"mail From:<root@bigco.com>", b"250 <root@bigco.com>... Sender Ok\r\n"),
    (b"rcpt To:<root@bigco.com>", b"250 <root@bigco.com> OK\r\n"),
    (b"data", b'354 Enter mail, end with "." on a line by itself\r\n'),
    (b"This is a test.\r\n.", b"250 Mail accepted, queued as "),
    (b"quit", b"221 Closing connection\r\n"),
]


def test_seed_transcript_verbatim(any_rig: Rig) -> None:
    c = any_rig.client(banner=False)
    host = any_rig.rows("SELECT 1", wait=False)  # the database is there before any byte
    assert host == [(1,)]
    assert c.reply().endswith(b" SMTP/smap Ready.\r\n")
    replies = [c.cmd(line) for line, _ in SEED]
    for (_, want), got in zip(SEED, replies, strict=True):
        assert got.startswith(want)
    assert c.eof()
    qid = replies[4].split()[-1].decode()
    (msg,) = any_rig.rows(
        "SELECT queue_id, state, mail_from, helo, protocol, size, body, client_addr, trace"
        " FROM messages"
    )
    assert msg[:8] == (
        qid,
        "received",
        "root@bigco.com",
        "bigco.com",
        "SMTP",
        17,
        b"This is a test.\r\n",
        "127.0.0.1",
    )
    trace = str(msg[8])
    assert trace.startswith("Received: from bigco.com (unknown [127.0.0.1])\r\n\tby ")
    assert "via smap (smapq " in trace and f"id {qid}; " in trace
    assert any_rig.rows("SELECT position, address FROM recipients") == [(0, "root@bigco.com")]
    kinds = any_rig.rows("SELECT kind, queue_id, address, code FROM events ORDER BY id")
    assert [k[0] for k in kinds] == ["connect", "helo", "mail", "rcpt", "accept", "disconnect"]
    assert [k[1] for k in kinds] == [None, None, qid, qid, qid, None]
    sessions = any_rig.rows("SELECT DISTINCT session_id FROM events")
    assert len(sessions) == 1 and sessions == any_rig.rows("SELECT session_id FROM messages")


def test_smtplib_ehlo_and_a_lone_dot_line(rig: Rig) -> None:
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.org, carol@example.org"
    msg["Subject"] = "smapq"
    msg.set_content("first\n.\n..two dots\nlast\n")
    rig.opened += 1
    with smtplib.SMTP("127.0.0.1", rig.server.port, timeout=120) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes", "smtputf8"):
            assert client.has_extn(ext), ext
        assert client.send_message(msg) == {}
        assert client.noop()[0] == 250
    (body, protocol, helo) = rig.rows("SELECT body, protocol, helo FROM messages")[0]
    assert isinstance(body, bytes)
    assert body.endswith(b"\r\n\r\nfirst\r\n.\r\n..two dots\r\nlast\r\n")
    assert (protocol, helo) == ("ESMTP", "client.example")
    assert rig.rows("SELECT address FROM recipients ORDER BY position") == [
        ("bob@example.org",),
        ("carol@example.org",),
    ]


def test_smtputf8_message_is_received_with_utf8smtp(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c.example")
    sender = "jörg@bücher.example".encode()
    assert c.cmd(b"MAIL FROM:<" + sender + b"> SMTPUTF8") == R.R250_SENDER_OK % (
        b"<" + sender + b">"
    )
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"hi\r\n.").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert c.eof()
    ((protocol, trace),) = rig.rows("SELECT protocol, trace FROM messages")
    assert protocol == "UTF8SMTP"
    assert " with UTF8SMTP\r\n\tid " in str(trace)  # RFC 6531 3.7.3


def test_pipelined_ehlo_session_with_two_messages(any_rig: Rig) -> None:
    c = any_rig.client()
    assert c.cmd(b"EHLO c.example").startswith(b"250-")  # EHLO ends a group (RFC 2920)
    c.send(b"MAIL FROM:<a@x.example> BODY=8BITMIME\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    assert c.reply() == R.R250_SENDER_OK % b"<a@x.example>"
    assert c.reply() == R.R250_RCPT_OK % b"<b@y.example>"
    assert c.reply() == R.R354_DATA
    # The next group follows the dot at once: those commands wait for the COMMIT.
    c.send(b"one \xe9\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n")
    first = c.reply()
    assert first.startswith(b"250 2.0.0 Mail accepted, queued as ")
    assert c.reply() == R.R250_SENDER_OK % b"<>"
    assert c.reply() == R.R250_RCPT_OK % b"<postmaster>"
    assert c.reply() == R.R354_DATA
    c.send(b".\r\nQUIT\r\n")
    assert c.reply().startswith(b"250 2.0.0 Mail accepted")
    assert c.reply() == R.R221_BYE
    assert c.eof()
    assert any_rig.rows("SELECT mail_from, body FROM messages ORDER BY id") == [
        ("a@x.example", b"one \xe9\r\n"),
        ("", b""),
    ]


def test_maxbytes_is_answered_after_the_final_dot(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: maxbytes 2048\n", kind=transport)
    c = rig.client()
    assert b"SIZE 2048" in c.cmd(b"EHLO c")
    assert c.cmd(b"MAIL FROM:<a@b.c> SIZE=4096") == R.R552_TOO_BIG
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    assert c.cmd(b"DATA") == R.R354_DATA
    c.send(b"".join(b"x" * 70 + b"\r\n" for _ in range(100)))
    c.send(b"MAIL FROM:<smuggled@evil.example>\r\n")  # still body: must not run
    assert c.cmd(b".") == R.R552_TOO_BIG
    assert c.cmd(b"RSET") == R.R250_RESET
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert c.eof()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]
    rejects = rig.rows("SELECT detail, code FROM events WHERE kind = 'reject' ORDER BY id")
    assert ("message over maxbytes", 552) in rejects
    assert rig.rows("SELECT count(*) FROM events WHERE address LIKE 'smuggled%'") == [(0,)]


def test_maxrecip(rig_factory: Callable[..., Rig], transport: str) -> None:
    rig = rig_factory("smap: maxrecip 2\n", kind=transport)
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    assert c.cmd(b"RCPT TO:<r1@e.f>") == R.R250_RCPT_OK % b"<r1@e.f>"
    assert c.cmd(b"RCPT TO:<r2@e.f>") == R.R250_RCPT_OK % b"<r2@e.f>"
    assert c.cmd(b"RCPT TO:<r3@e.f>") == R.R452_TOO_MANY_RCPTS
    c.cmd(b"DATA")
    assert c.cmd(b"hi\r\n.").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert c.eof()
    assert rig.rows("SELECT address FROM recipients ORDER BY position") == [
        ("r1@e.f",),
        ("r2@e.f",),
    ]


def test_line_limits(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    assert c.cmd(b"NOOP " + b"x" * 600) == R.R500_COMMAND_TOO_LONG
    assert c.cmd(b"NOOP") == R.R250_OK
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"y" * 1200 + b"\r\n.") == R.R500_DATA_LINE_TOO_LONG
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]


def test_sequence_and_syntax_errors_then_too_many(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: maxerrors 4\n", kind=transport)
    c = rig.client()
    assert c.cmd(b"RCPT TO:<a@b.c>") == R.plain(R.R503_NEED_MAIL)
    assert c.cmd(b"MAIL FROM:<-oQ/tmp@b.c>") == R.plain(R.R553_SENDER_DASH)
    assert c.cmd(b"MAIL FROM:<a b@c>") == R.plain(R.R501_BAD_SENDER)
    assert c.cmd(b"BOGUS") == R.plain(R.R500_UNRECOGNIZED)
    assert c.reply().endswith(b" Error: too many errors\r\n")
    assert c.eof()
    rows = rig.rows("SELECT kind, detail, code FROM events WHERE kind = 'reject' ORDER BY id")
    assert [r[2] for r in rows] == [503, 553, 501, 500, 421]
    assert rig.rows("SELECT detail FROM events WHERE kind = 'disconnect'") == [
        ("too many errors",)
    ]


def test_idle_timeout_421(rig_factory: Callable[..., Rig], transport: str) -> None:
    rig = rig_factory("smap: timeout 1\n", kind=transport)
    c = rig.client()
    c.cmd(b"EHLO c")
    # A group ending in DATA, then half a message: it times out in DATA.
    c.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    while not (reply := c.reply()).startswith(b"354 "):
        assert reply[:1] == b"2", reply
    c.send(b"half a message\r\n")
    assert c.reply().startswith(b"421 4.4.2 ")
    assert c.eof()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]
    assert rig.rows("SELECT detail, code FROM events WHERE kind = 'timeout'") == [("in DATA", 421)]


SMUGGLE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n"]


@pytest.mark.parametrize("fake", SMUGGLE_ENDS, ids=[repr(f) for f in SMUGGLE_ENDS])
def test_smtp_smuggling_is_refused(rig: Rig, fake: bytes) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    c.send(
        b"Subject: hi\r\n\r\nhello"
        + fake
        + b"MAIL FROM:<admin@victim.example>\r\nRCPT TO:<t@victim.example>\r\nDATA\r\n"
        b"smuggled\r\n"
    )
    assert c.cmd(b".") == R.R550_BARE_NEWLINE
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert c.eof()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]
    assert rig.rows("SELECT count(*) FROM events WHERE address LIKE '%victim%'") == [(0,)]


def test_dropped_connection_leaves_no_message(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"HELO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    c.send(b"partial body\r\n")
    c.close()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]  # after smap exited
    assert rig.rows("SELECT detail FROM events WHERE kind = 'disconnect'") == [
        ("peer dropped connection in DATA",)
    ]


def test_vrfy_expn_reveal_nothing_and_are_logged(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    assert c.cmd(b"VRFY root") == R.R252_VRFY
    assert c.cmd(b"EXPN staff") == R.R502_EXPN
    c.cmd(b"QUIT")
    assert c.eof()
    assert rig.rows(
        "SELECT kind, detail FROM events WHERE kind IN ('vrfy', 'expn') ORDER BY id"
    ) == [
        ("vrfy", "root"),
        ("expn", "staff"),
    ]


def test_bad_table_answers_421_not_a_traceback(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    rig.spool.table.write_text(rig.spool.table.read_text() + "smap: maxbytes lots\n")
    c = rig.client(banner=False)
    reply = c.reply()
    assert reply.startswith(b"421 4.3.0 ")
    assert c.eof()


@contextmanager
def writes_blocked(spool: Spool) -> Iterator[None]:
    """Another connection holds the queue's write lock (SQLite) or a lock on the
    messages table that every insert waits for (PostgreSQL)."""
    if spool.database:
        import psycopg

        from tests.pgdb import libpq_url

        with psycopg.connect(libpq_url(spool.database)) as blocker:
            blocker.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            yield
            blocker.rollback()
        return
    blocker = sqlite3.connect(spool.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_database_busy_is_451_and_the_session_goes_on(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    with writes_blocked(rig.spool):
        assert c.cmd(b"one\r\n.") == R.R451_STORE_FAILED  # after the busy timeout
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"two\r\n.").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert c.eof()
    assert rig.rows("SELECT body FROM messages") == [(b"two\r\n",)]
    assert rig.rows("SELECT code FROM events WHERE kind = 'reject'") == [(451,)]


def test_client_that_never_reads_is_dropped(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: timeout 1\nsmap: maxrecip 100000\n", kind=transport)
    # A small receive buffer and nothing read, not even the banner: the receiver's
    # replies fill the buffers long before it has read what the first sendall queued,
    # so it blocks writing (never waits a second for input), however this process runs.
    c = rig.client(rcvbuf=4096)
    c.cmd(b"EHLO c")
    c.sock.settimeout(2)
    # Up to maxrecip, RCPTs are neither junk nor errors: only their long replies pile up
    # (26 MB of them, more than both socket buffers hold).
    flood = (b"RCPT TO:<" + b"r" * 240 + b"@e.f>\r\n") * 1000
    try:
        c.sock.sendall(b"MAIL FROM:<a@b.c>\r\n" + flood)
        for _ in range(99):
            c.sock.sendall(flood)
    except TimeoutError:
        pass  # both sides' buffers are full: smap is blocked writing to us
    except (ConnectionResetError, BrokenPipeError):
        pass  # smap already gave up on us
    rig.idle()  # it gave up after its timeout instead of waiting for us forever
    assert rig.rows("SELECT detail FROM events WHERE kind = 'disconnect'") == [
        ("client stopped reading replies",)
    ]


def test_accepted_message_survives_later_errors_in_the_session(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: maxerrors 2\n", kind=transport)
    c = rig.client()
    c.cmd(b"HELO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"kept\r\n.").startswith(b"250 ")
    c.cmd(b"BOGUS")
    assert c.cmd(b"BOGUS") == R.plain(R.R500_UNRECOGNIZED)
    assert c.reply().startswith(b"421 ")
    assert c.eof()
    assert rig.rows("SELECT body, state FROM messages") == [(b"kept\r\n", "received")]


def report(rig: Rig, name: str) -> list[dict[str, object]]:
    """``smapq report NAME --format json`` (the stable format) on the rig's spool."""
    rig.idle()
    out = rig.spool.smapq("report", name, "--format", "json").stdout
    rows = json.loads(out)["rows"]
    assert isinstance(rows, list)
    return rows


def test_refused_traffic_is_audited_for_the_reports(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    assert c.cmd(b"MAIL FROM:<-oQ/tmp@x>") == R.R553_SENDER_DASH
    assert c.cmd(b"MAIL FROM:<alice@example.org>") == R.R250_SENDER_OK % b"<alice@example.org>"
    assert c.cmd(b"RCPT TO:<bob@example.org> NOTIFY=NEVER") == R.R555_PARAM
    assert c.cmd(b"VRFY root") == R.R252_VRFY
    assert c.cmd(b"RCPT TO:<bob@example.org>") == R.R250_RCPT_OK % b"<bob@example.org>"
    c.cmd(b"DATA")
    qid = c.cmd(b"hi\r\n.").split()[-1].decode()
    assert c.cmd(b"MAIL FROM:<alice@example.org> SIZE=999999999") == R.R552_TOO_BIG
    assert c.cmd(b"MAIL FROM:<> SIZE=999999999") == R.R552_TOO_BIG
    c.cmd(b"QUIT")
    assert c.eof()
    # In the order they happened, each refusal naming the refused address and its code;
    # the message's own events carry its queue id.
    assert rig.rows("SELECT kind, address, code, queue_id FROM events ORDER BY id") == [
        ("connect", None, 220, None),
        ("helo", None, 250, None),  # the HELO name is in the detail, not an address
        ("reject", "-oQ/tmp@x", 553, None),
        ("mail", "alice@example.org", 250, qid),
        ("reject", "bob@example.org", 555, qid),
        ("vrfy", None, 252, None),
        ("rcpt", "bob@example.org", 250, qid),
        ("accept", "alice@example.org", 250, qid),
        ("reject", "alice@example.org", 552, None),
        ("reject", "", 552, None),  # the null sender, stored as messages.mail_from has it
        ("disconnect", None, None, None),
    ]
    senders = {r["sender"]: r["refused"] for r in report(rig, "senders")}
    assert senders == {"alice@example.org": 1}
    recipients = {r["recipient"]: r["refused"] for r in report(rig, "recipients")}
    assert recipients == {"bob@example.org": 1}
    (client,) = report(rig, "clients")
    assert (client["client_addr"], client["refused"]) == ("127.0.0.1", 4)
    (session,) = report(rig, "sessions")
    assert {k: session[k] for k in ("connections", "accepted", "refused", "vrfy")} == {
        "connections": 1,
        "accepted": 1,
        "refused": 4,
        "vrfy": 1,
    }
    refused = {(r["kind"], r["code"]): r["count"] for r in report(rig, "refused")}
    assert refused == {
        ("reject", 553): 1,
        ("reject", 555): 1,
        ("reject", 552): 2,
        ("vrfy", 252): 1,
    }


def test_a_helo_flood_ends_in_421_with_bounded_events(rig: Rig) -> None:
    # Each HELO used to add an event row kept in memory until the session ended: 2
    # million of them took 500 MB and a 15 s write lock on the queue.
    c = rig.client()
    n = limits.JUNK_COMMAND_LIMIT + limits.ERROR_LIMIT
    for _ in range(n):
        assert c.cmd(b"HELO x") == R.R250_HELO % b"x"
    assert c.reply().endswith(b" Error: too many errors\r\n")
    assert c.eof()
    assert rig.rows("SELECT kind, count(*) FROM events GROUP BY kind ORDER BY kind") == [
        ("connect", 1),
        ("disconnect", 1),
        ("helo", n),
        ("reject", 1),
    ]


def test_events_past_the_flush_size_are_all_written_in_order(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: maxrecip 2000\n", kind=transport)
    c = rig.client()
    txn = b"MAIL FROM:<a@b.c>\r\n" + b"".join(b"RCPT TO:<r%d@e.f>\r\n" % i for i in range(700))
    c.cmd(b"EHLO c")
    c.send((txn + b"RSET\r\n") * 2 + txn + b"DATA\r\n")
    while c.reply() != R.R354_DATA:
        pass
    qid = c.cmd(b"x\r\n.").split()[-1].decode()
    c.cmd(b"QUIT")
    assert c.eof()
    rows = rig.rows("SELECT kind, queue_id FROM events ORDER BY id")
    txn_kinds = ["mail"] + ["rcpt"] * 700
    assert [k for k, _ in rows] == (
        ["connect", "helo", *txn_kinds, *txn_kinds, *txn_kinds, "accept", "disconnect"]
    )
    assert [q for _, q in rows] == [None] * (2 + 2 * 701) + [qid] * 702 + [None]


SENT_AHEAD = [
    # (what the client sends at once after the banner, the command it came after)
    (b"HELO c\r\nMAIL FROM:<a@b.c>\r\n", b"HELO"),  # no PIPELINING without EHLO
    (b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n", b"EHLO"),  # before EHLO's reply offered it
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n", b"MAIL"),  # no EHLO at all
]


@pytest.mark.parametrize(("ahead", "after"), SENT_AHEAD, ids=["helo", "ehlo", "none"])
def test_unauthorised_pipelining_is_554_and_nothing_runs(
    rig: Rig, ahead: bytes, after: bytes
) -> None:
    c = rig.client()
    c.send(ahead)
    assert c.reply() == R.plain(R.R554_SYNC)
    assert c.eof()
    assert rig.rows("SELECT kind, code, detail FROM events ORDER BY id") == [
        ("connect", 220, None),
        ("reject", 554, "improper command pipelining after " + after.decode()),
        ("disconnect", None, "protocol synchronization"),
    ]


def test_data_before_354_and_commands_after_a_helo_dot_are_554(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    c.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nsmuggled\r\n.\r\n")
    assert c.reply() == R.R250_SENDER_OK % b"<a@b.c>"
    assert c.reply() == R.R250_RCPT_OK % b"<d@e.f>"
    assert c.reply() == R.R554_SYNC  # DATA ends a group: the body came before 354
    assert c.eof()
    h = rig.client()
    h.cmd(b"HELO c")
    h.cmd(b"MAIL FROM:<a@b.c>")
    h.cmd(b"RCPT TO:<d@e.f>")
    h.cmd(b"DATA")
    h.send(b"body\r\n.\r\nMAIL FROM:<x@y.z>\r\n")  # a HELO session may not pipeline
    assert h.reply() == R.plain(R.R554_SYNC)
    assert h.eof()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]
    assert sorted(rig.rows("SELECT detail FROM events WHERE code = 554")) == [
        ("improper command pipelining after DATA",),
        ("improper command pipelining after the end of data",),
    ]


def test_strictpipelining_off_takes_what_clients_send_ahead(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: strictpipelining off\n", kind=transport)
    c = rig.client()
    c.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    replies = [c.reply() for _ in range(6)]
    assert replies[4].startswith(b"250 2.0.0 Mail accepted")
    assert replies[5] == R.R221_BYE
    assert rig.rows("SELECT body FROM messages") == [(b"hi\r\n",)]


def test_nul_in_message_data_is_refused(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"a \0 b\r\n.") == R.R550_NUL
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"clean\r\n.").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert rig.rows("SELECT body FROM messages") == [(b"clean\r\n",)]
    assert rig.rows("SELECT detail, code FROM events WHERE kind = 'reject'") == [
        ("NUL character in message data", 550)
    ]


def test_concurrent_smtplib_clients_each_get_their_own_messages(rig: Rig) -> None:
    """Eight smtplib clients at once, three messages each over one connection: every
    250 names a stored message holding exactly what that client sent."""
    import threading

    acked: dict[str, bytes] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", rig.server.port, timeout=120) as s:
                s.ehlo(f"client{n}.example")
                for i in range(3):
                    body = f"Subject: {n}/{i}\r\n\r\nfrom client {n}, message {i}\r\n"
                    s.mail(f"c{n}@example.org")
                    s.rcpt(f"r{i}@example.net")
                    code, reply = s.data(body.encode())
                    assert code == 250, reply
                    with lock:
                        acked[reply.split()[-1].decode()] = body.encode()
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    rig.opened += len(threads)
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    stored = dict(rig.rows("SELECT queue_id, body FROM messages"))
    assert stored == acked
