"""Transcripts through the sans-I/O session, split at every byte boundary."""

from __future__ import annotations

import pytest

from smapq.smtp import limits
from smapq.smtp import replies as R
from tests.smtp.sessiondrive import banner, drive, ehlo_reply

SEED_IN = (
    b"helo bigco.com\r\n"
    b"mail From:<root@bigco.com>\r\n"
    b"rcpt To:<root@bigco.com>\r\n"
    b"data\r\n"
    b"This is a test.\r\n"
    b".\r\n"
    b"quit\r\n"
)
SEED_OUT = (
    b"220 mx.example SMTP/smap Ready.\r\n"
    b"250 (bigco.com) pleased to meet you.\r\n"
    b"250 <root@bigco.com>... Sender Ok\r\n"
    b"250 <root@bigco.com> OK\r\n"
    b'354 Enter mail, end with "." on a line by itself\r\n'
    b"250 Mail accepted, queued as Q1\r\n"
    b"221 Closing connection\r\n"
)

PIPELINED_IN = (
    b"EHLO client.example\r\n"
    b"MAIL FROM:<a@x.example> SIZE=40 BODY=8BITMIME\r\n"
    b"RCPT TO:<b@y.example>\r\n"
    b"RCPT TO:<c@y.example>\r\n"
    b"DATA\r\n"
    b"Subject: one\r\n\r\n..dot\r\n\xc3\xa9\r\n.\r\n"
    b"MAIL FROM:<>\r\n"
    b"RCPT TO:<postmaster>\r\n"
    b"DATA\r\n"
    b".\r\n"
    b"RSET\r\nNOOP\r\nQUIT\r\n"
)


def test_seed_transcript_verbatim() -> None:
    run = drive([SEED_IN])
    assert run.out == SEED_OUT
    # The same, built from the named constants.
    assert run.out == (
        banner()
        + R.R250_HELO % b"bigco.com"
        + R.plain(R.R250_SENDER_OK % b"<root@bigco.com>")
        + R.plain(R.R250_RCPT_OK % b"<root@bigco.com>")
        + R.R354_DATA
        + R.plain(R.R250_ACCEPTED % b"Q1")
        + R.plain(R.R221_BYE)
    )
    (env,) = run.envelopes
    assert env.sender == "root@bigco.com"
    assert env.recipients == ["root@bigco.com"]
    assert env.body == b"This is a test.\r\n"
    assert (env.helo, env.protocol, env.size) == ("bigco.com", "SMTP", 17)
    assert run.session.closed


def test_pipelined_ehlo_session() -> None:
    run = drive([PIPELINED_IN])
    assert run.out == (
        banner()
        + ehlo_reply()
        + R.R250_SENDER_OK % b"<a@x.example>"
        + R.R250_RCPT_OK % b"<b@y.example>"
        + R.R250_RCPT_OK % b"<c@y.example>"
        + R.R354_DATA
        + R.R250_ACCEPTED % b"Q1"
        + R.R250_SENDER_OK % b"<>"
        + R.R250_RCPT_OK % b"<postmaster>"
        + R.R354_DATA
        + R.R250_ACCEPTED % b"Q2"
        + R.R250_RESET
        + R.R250_OK
        + R.R221_BYE
    )
    one, two = run.envelopes
    assert one.body == b"Subject: one\r\n\r\n.dot\r\n\xc3\xa9\r\n"
    assert one.params == {"SIZE": "40", "BODY": "8BITMIME"}
    assert one.protocol == "ESMTP"
    assert (two.sender, two.recipients, two.body) == ("", ["postmaster"], b"")


@pytest.mark.parametrize("data", [SEED_IN, PIPELINED_IN], ids=["seed", "pipelined"])
def test_every_split_gives_the_same_result(data: bytes) -> None:
    whole = drive([data])
    for i in range(len(data) + 1):
        run = drive([data[:i], data[i:]])
        assert run.out == whole.out, i
        assert run.envelope_facts() == whole.envelope_facts(), i
        assert run.session.events == whole.session.events, i
    for i in range(1, len(data), 7):
        for j in range(i, len(data), 11):
            run = drive([data[:i], data[i:j], data[j:]])
            assert run.out == whole.out, (i, j)
            assert run.envelope_facts() == whole.envelope_facts(), (i, j)


@pytest.mark.parametrize("data", [SEED_IN, PIPELINED_IN], ids=["seed", "pipelined"])
def test_byte_by_byte(data: bytes) -> None:
    whole = drive([data])
    run = drive([data[i : i + 1] for i in range(len(data))])
    assert run.out == whole.out
    assert run.envelope_facts() == whole.envelope_facts()


def test_input_after_the_dot_waits_for_the_storage_outcome() -> None:
    from smapq.smtp.session import Session

    s = Session("mx.example")
    s.greeting()
    out = s.feed(b"HELO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\nNOOP\r\n")
    assert out.endswith(R.R354_DATA)
    assert s.pending is not None
    assert s.feed(b"QUIT\r\n") == b""  # buffered, not answered
    out = s.store_failed(R.R451_STORE_FAILED, "database is locked")
    assert out == R.plain(R.R451_STORE_FAILED) + R.plain(R.R250_OK) + R.plain(R.R221_BYE)
    assert ("reject", "database is locked", "a@b.c", 451) in s.events
    assert s.closed


def test_storage_outcome_without_pending_is_a_driver_bug() -> None:
    from smapq.smtp.session import Session

    s = Session("mx.example")
    with pytest.raises(RuntimeError):
        s.stored("Q1")


def test_events_record_the_dialogue() -> None:
    data = (
        b"EHLO c.example\r\nVRFY root\r\nEXPN staff\r\nMAIL FROM:<-x@y.z>\r\n"
        b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    )
    run = drive([data])
    assert run.session.events == [
        ("connect", "", "", 220),
        ("helo", "EHLO c.example", "", 250),  # a HELO name is no mailbox: in the detail
        ("vrfy", "root", "", 252),
        ("expn", "staff", "", 502),
        ("reject", "sender: address starts with '-'", "-x@y.z", 553),
        ("mail", "", "a@b.c", 250),
        ("rcpt", "", "d@e.f", 250),
        ("accept", "Q1", "a@b.c", 250),
        ("disconnect", "quit", "", 0),
    ]


def test_vrfy_and_expn_reveal_nothing() -> None:
    run = drive([b"EHLO c\r\nVRFY root\r\nVRFY nosuchuser\r\nEXPN root\r\nHELP\r\n"])
    assert run.out == (
        banner() + ehlo_reply(b"c") + R.R252_VRFY + R.R252_VRFY + R.R502_EXPN + R.R214_HELP
    )


def test_helo_session_gets_plain_replies_ehlo_gets_enhanced() -> None:
    helo = drive([b"HELO c\r\nNOOP\r\nRSET\r\nFOO\r\n"])
    assert helo.out.endswith(b"250 OK\r\n250 Reset state\r\n500 Command unrecognized\r\n")
    ehlo = drive([b"EHLO c\r\nNOOP\r\nRSET\r\nFOO\r\n"])
    assert ehlo.out.endswith(R.R250_OK + R.R250_RESET + R.R500_UNRECOGNIZED)


def test_mail_is_not_required_to_follow_helo_but_sequence_is_enforced() -> None:
    run = drive(
        [
            b"RCPT TO:<a@b.c>\r\nDATA\r\nMAIL FROM:<a@b.c>\r\nMAIL FROM:<a@b.c>\r\n"
            b"DATA\r\nRCPT TO:<a@b.c>\r\nDATA x\r\n"
        ]
    )
    assert run.out == banner() + b"".join(
        R.plain(r)
        for r in (
            R.R503_NEED_MAIL,
            R.R503_NEED_MAIL,
            R.R250_SENDER_OK % b"<a@b.c>",
            R.R503_NESTED_MAIL,
            R.R503_NEED_RCPT,
            R.R250_RCPT_OK % b"<a@b.c>",
            R.R501_DATA_SYNTAX,
        )
    )


def test_helo_and_rset_reset_the_transaction() -> None:
    run = drive([b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nEHLO a\r\nRCPT TO:<a@b.c>\r\n"])
    assert run.out.endswith(ehlo_reply(b"a") + R.R503_NEED_MAIL)
    run = drive([b"EHLO a\r\nMAIL FROM:<a@b.c>\r\nRSET\r\nRCPT TO:<a@b.c>\r\n"])
    assert run.out.endswith(R.R250_RESET + R.R503_NEED_MAIL)


def test_helo_needs_an_argument() -> None:
    run = drive([b"HELO\r\nEHLO \r\nHELO a\x01b\r\n"])
    assert run.out == banner() + R.plain(R.R501_HELO_SYNTAX) + R.plain(
        R.R501_EHLO_SYNTAX
    ) + R.plain(R.R501_HELO_SYNTAX)


def test_helo_argument_fits_a_reply_line() -> None:
    # RFC 5321 4.5.3.1.5: a reply line is at most 512 octets; HELO/EHLO echo the name.
    longest = b"h" * limits.DOMAIN_MAX
    run = drive([b"EHLO " + longest + b"\r\nEHLO h" + longest + b"\r\nHELO h" + longest + b"\r\n"])
    assert run.out == (banner() + ehlo_reply(longest) + R.R501_EHLO_SYNTAX + R.R501_HELO_SYNTAX)
    assert max(map(len, run.out.split(b"\r\n"))) + 2 <= 512


def test_lowercase_verbs_and_lf_only_command_lines() -> None:
    run = drive([b"ehlo c\nnoop\nquit\n"])
    assert run.out == banner() + ehlo_reply(b"c") + R.R250_OK + R.R221_BYE


def test_input_after_quit_is_ignored() -> None:
    run = drive([b"QUIT\r\nNOOP\r\n", b"NOOP\r\n"])
    assert run.out == banner() + R.plain(R.R221_BYE)
    assert run.session.closed


def test_eof_in_data_stores_nothing() -> None:
    from smapq.smtp.session import Session

    s = Session("mx.example")
    s.greeting()
    s.feed(b"HELO a\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhalf a mess")
    assert s.in_data
    s.eof()
    assert s.pending is None
    assert s.closed
    assert s.events[-1] == ("disconnect", "peer dropped connection in DATA", "", 0)
