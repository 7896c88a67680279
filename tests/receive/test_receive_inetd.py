"""Acceptance: the installed ``smap`` under a real super-server, a real database file.

Driven by Python's smtplib and by raw sockets on a loopback port.  As root (CI) the
receiver really chroots into the spool and runs as nobody; otherwise the table turns
the jail off.
"""

from __future__ import annotations

import smtplib
import sqlite3
import time
from collections.abc import Callable
from email.message import EmailMessage

import pytest

from smapq.smtp import replies as R
from tests.receive.conftest import Rig

pytestmark = pytest.mark.integration

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
    kinds = any_rig.rows("SELECT kind, queue_id, address, code FROM events ORDER BY at, id")
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
    with smtplib.SMTP("127.0.0.1", rig.server.port, timeout=30) as client:
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


def test_pipelined_ehlo_session_with_two_messages(any_rig: Rig) -> None:
    c = any_rig.client()
    c.send(
        b"EHLO c.example\r\nMAIL FROM:<a@x.example> BODY=8BITMIME\r\n"
        b"RCPT TO:<b@y.example>\r\nDATA\r\n"
    )
    assert c.reply().startswith(b"250-")
    assert c.reply() == R.R250_SENDER_OK % b"<a@x.example>"
    assert c.reply() == R.R250_RCPT_OK % b"<b@y.example>"
    assert c.reply() == R.R354_DATA
    # The client (wrongly) pipelines past the dot: those commands wait for the COMMIT.
    c.send(b"one \xe9\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nDATA\r\n.\r\nQUIT\r\n")
    first = c.reply()
    assert first.startswith(b"250 2.0.0 Mail accepted, queued as ")
    assert c.reply() == R.R250_SENDER_OK % b"<>"
    assert c.reply() == R.R250_RCPT_OK % b"<postmaster>"
    assert c.reply() == R.R354_DATA
    assert c.reply().startswith(b"250 2.0.0 Mail accepted")
    assert c.reply() == R.R221_BYE
    assert c.eof()
    assert any_rig.rows("SELECT mail_from, body FROM messages ORDER BY id") == [
        ("a@x.example", b"one \xe9\r\n"),
        ("", b""),
    ]


def test_maxbytes_is_answered_after_the_final_dot(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: maxbytes 2048\n")
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


def test_maxrecip(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: maxrecip 2\n")
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


def test_sequence_and_syntax_errors_then_too_many(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: maxerrors 4\n")
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


def test_idle_timeout_421(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: timeout 1\n")
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    c.send(b"half a message\r\n")
    start = time.monotonic()
    assert c.reply().startswith(b"421 4.4.2 ")
    assert 0.9 < time.monotonic() - start < 10
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
    deadline = time.monotonic() + 10
    while not rig.rows("SELECT 1 FROM events WHERE kind = 'disconnect'"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]
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


def test_database_busy_is_451_and_the_session_goes_on(rig: Rig) -> None:
    c = rig.client()
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    blocker = sqlite3.connect(rig.spool.db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert c.cmd(b"one\r\n.") == R.R451_STORE_FAILED  # after the 5 s busy timeout
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(b"two\r\n.").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert c.eof()
    assert rig.rows("SELECT body FROM messages") == [(b"two\r\n",)]
    assert rig.rows("SELECT code FROM events WHERE kind = 'reject'") == [(451,)]


def test_client_that_never_reads_is_dropped(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: timeout 1\n")
    c = rig.client()
    c.sock.settimeout(2)
    flood = b"HELO x\r\n" * 8192  # neither junk nor errors: only the replies pile up
    try:
        for _ in range(2000):
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
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory("smap: maxerrors 2\n")
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
