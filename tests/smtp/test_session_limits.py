"""Every limit answers with its named reply and leaves the session in a clean state."""

from __future__ import annotations

import pytest

from smapq.smtp import limits
from smapq.smtp import replies as R
from tests.smtp.sessiondrive import banner, drive, ehlo_reply

EHLO = b"EHLO c\r\n"
TXN = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
TXN_OUT = R.R250_SENDER_OK % b"<a@b.c>" + R.R250_RCPT_OK % b"<d@e.f>" + R.R354_DATA
START = banner() + ehlo_reply(b"c")


def command_of_length(total: int) -> bytes:
    """A NOOP line of exactly ``total`` octets, CRLF included."""
    return b"NOOP " + b"x" * (total - 7) + b"\r\n"


def test_command_line_of_512_octets_is_fine_513_is_not() -> None:
    ok = command_of_length(limits.COMMAND_LINE_MAX)
    bad = command_of_length(limits.COMMAND_LINE_MAX + 1)
    assert len(ok) == 512
    run = drive([EHLO + ok + bad + b"NOOP\r\n"])
    assert run.out == START + R.R250_OK + R.R500_COMMAND_TOO_LONG + R.R250_OK


def test_overlong_command_is_read_to_its_end_in_any_chunking() -> None:
    line = b"MAIL FROM:<" + b"a" * 5000 + b"@b.c>\r\n"
    whole = drive([EHLO + line + b"NOOP\r\n"])
    assert whole.out == START + R.R500_COMMAND_TOO_LONG + R.R250_OK
    chunks = [EHLO] + [line[i : i + 100] for i in range(0, len(line), 100)] + [b"NOOP\r\n"]
    assert drive(chunks).out == whole.out
    # The session keeps no more than a command line's worth of the junk.
    assert len(drive(chunks[:-1]).session._buf) < limits.COMMAND_LINE_MAX


def data_line(content_len: int) -> bytes:
    return b"y" * content_len + b"\r\n"


def test_text_line_of_1000_octets_is_fine_1001_is_not() -> None:
    ok = drive([EHLO + TXN + data_line(998) + b".\r\nNOOP\r\n"])
    assert ok.out == START + TXN_OUT + R.R250_ACCEPTED % b"Q1" + R.R250_OK
    assert ok.envelopes[0].body == data_line(998)
    bad = drive([EHLO + TXN + data_line(999) + b".\r\nNOOP\r\n"])
    assert bad.out == START + TXN_OUT + R.R500_DATA_LINE_TOO_LONG + R.R250_OK
    assert bad.envelopes == []


def test_stuffed_dot_does_not_count_against_the_line_limit() -> None:
    run = drive([EHLO + TXN + b"." + data_line(998) + b".\r\n"])
    assert run.envelopes[0].body == data_line(998)


def test_huge_line_is_read_to_the_final_dot_with_bounded_memory() -> None:
    chunks = [EHLO + TXN] + [b"z" * 4096] * 100
    run = drive(chunks)
    assert len(run.session._buf) < 2 * limits.TEXT_LINE_MAX
    run = drive([*chunks, b"\r\n.\r\nNOOP\r\n"])
    assert run.out == START + TXN_OUT + R.R500_DATA_LINE_TOO_LONG + R.R250_OK


def test_maxrecip() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@e.f>\r\n" % i for i in range(4))
    run = drive(
        [EHLO + b"MAIL FROM:<a@b.c>\r\n" + rcpts + b"DATA\r\nx\r\n.\r\n"], max_recipients=3
    )
    assert run.out == (
        START
        + R.R250_SENDER_OK % b"<a@b.c>"
        + b"".join(R.R250_RCPT_OK % b"<r%d@e.f>" % i for i in range(3))
        + R.R452_TOO_MANY_RCPTS
        + R.R354_DATA
        + R.R250_ACCEPTED % b"Q1"
    )
    assert run.envelopes[0].recipients == ["r0@e.f", "r1@e.f", "r2@e.f"]
    assert ("reject", "too many recipients", "r3@e.f", 452) in run.session.events


def test_maxrecip_counts_per_transaction() -> None:
    one = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\n"
    run = drive([EHLO + one + one], max_recipients=1)
    assert len(run.envelopes) == 2


def test_maxbytes_exact_boundary() -> None:
    body = b"12345678\r\n"  # 10 octets
    run = drive([EHLO + TXN + body + b".\r\n" + TXN + body + b"x\r\n.\r\n"], max_bytes=10)
    assert run.out == (
        banner()
        + ehlo_reply(b"c", R.EHLO_SIZE_LIMIT % 10)
        + TXN_OUT
        + R.R250_ACCEPTED % b"Q1"
        + TXN_OUT
        + R.R552_TOO_BIG
    )
    assert [e.body for e in run.envelopes] == [body]


def test_maxbytes_counts_unstuffed_octets() -> None:
    run = drive([EHLO + TXN + b"..\r\n..\r\n.\r\n"], max_bytes=6)
    assert run.envelopes[0].body == b".\r\n.\r\n"


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_oversized_message_is_read_to_the_final_dot(chunk: int) -> None:
    body = b"line of text\r\n" * 20000 + b".\r\nMAIL FROM:<evil@x.y>\r\n"
    data = EHLO + TXN + body + b"NOOP\r\n"
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    run = drive(chunks, max_bytes=1000)
    assert run.out == (
        banner()
        + ehlo_reply(b"c", R.EHLO_SIZE_LIMIT % 1000)
        + TXN_OUT
        + R.R552_TOO_BIG
        + R.R250_SENDER_OK % b"<evil@x.y>"
        + R.R250_OK
    )
    assert run.envelopes == []


def test_oversized_message_memory_is_bounded() -> None:
    run = drive([EHLO + TXN] + [b"a" * 60 + b"\r\n"] * 10000, max_bytes=1000)
    assert len(run.session._buf) < 1400


def test_mail_size_parameter_over_maxbytes() -> None:
    run = drive(
        [EHLO + b"MAIL FROM:<a@b.c> SIZE=1001\r\nMAIL FROM:<a@b.c> SIZE=1000\r\n"], max_bytes=1000
    )
    assert run.out.endswith(R.R552_TOO_BIG + R.R250_SENDER_OK % b"<a@b.c>")


def test_too_many_errors_closes_with_421() -> None:
    run = drive([EHLO + b"BOGUS\r\n" * 20 + b"NOOP\r\n"], error_limit=5)
    assert run.out == (START + R.R500_UNRECOGNIZED * 5 + R.R421_TOO_MANY_ERRORS % b"mx.example")
    assert run.session.closed
    assert run.session.events[-1] == ("disconnect", "too many errors", "", 0)


def test_default_error_limit() -> None:
    run = drive([b"X\r\n" * 50])
    assert run.codes() == [220] + [500] * (limits.ERROR_LIMIT - 1) + [500, 421]


def test_junk_commands_eventually_count_as_errors() -> None:
    n = limits.JUNK_COMMAND_LIMIT + limits.ERROR_LIMIT
    run = drive([EHLO + b"NOOP\r\n" * (n + 5)])
    assert run.codes() == [220, 250] + [250] * (n - 1) + [421]  # EHLO counts too


def test_junk_count_restarts_after_each_accepted_message() -> None:
    # Postfix does the same: a client that says RSET before every message may send
    # any number of them on one connection.
    one = b"RSET\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\n"
    n = 2 * (limits.JUNK_COMMAND_LIMIT + limits.ERROR_LIMIT)
    run = drive([EHLO + one * n + b"QUIT\r\n"])
    assert len(run.envelopes) == n
    assert run.codes()[-1] == 221


def test_recipients_past_the_overshoot_count_as_errors() -> None:
    over = limits.RECIPIENT_OVERSHOOT + limits.ERROR_LIMIT
    rcpts = b"".join(b"RCPT TO:<r%d@e.f>\r\n" % i for i in range(2 + over + 5))
    run = drive([EHLO + b"MAIL FROM:<a@b.c>\r\n" + rcpts], max_recipients=2)
    assert run.codes() == [220, 250, 250, 250, 250] + [452] * over + [421]
    assert run.session.closed


# Commands that each make an audit event without storing mail.  Every one of them,
# repeated, must end in 421: otherwise a client could grow the receiver's memory and
# the audit log without bound (a flood of "HELO x" once made 2 million rows).
FLOODS = [
    b"HELO x\r\n",
    b"EHLO x\r\n",
    b"NOOP\r\n",
    b"VRFY root\r\n",
    b"MAIL FROM:<a@b.c>\r\nRSET\r\n",
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<g@h.i>\r\nHELO x\r\n",
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\na\nb\r\n.\r\n",
    b"RCPT TO:<d@e.f>\r\n",
]


@pytest.mark.parametrize("unit", FLOODS, ids=[f.split(b"\r")[0].decode() for f in FLOODS])
def test_a_session_that_stores_nothing_makes_bounded_events(unit: bytes) -> None:
    run = drive([EHLO + b"MAIL FROM:<a@b.c>\r\n" + unit * 20000], max_recipients=1)
    assert run.session.closed
    assert run.codes()[-1] == 421
    # Junk + errors allowance, each with a transaction's worth of events at most.
    bound = (limits.JUNK_COMMAND_LIMIT + limits.ERROR_LIMIT) * 6 + limits.RECIPIENT_OVERSHOOT
    assert len(run.session.events) < bound


def test_refused_transactions_count_as_errors() -> None:
    bad = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\na\nb\r\n.\r\n"
    run = drive([EHLO + bad * 3], error_limit=3)
    assert run.codes()[-2:] == [550, 421]


def test_timeout_replies_421_and_closes() -> None:
    run = drive([EHLO + b"MAIL FROM:<a@b.c>\r\n"], timeout_at_end=True)
    assert run.out.endswith(R.R421_TIMEOUT % b"mx.example")
    assert run.session.closed
    assert run.session.events[-2:] == [
        ("timeout", "", "", 421),
        ("disconnect", "timeout", "", 0),
    ]
    assert run.session.timeout() == b""


def test_timeout_in_data_stores_nothing() -> None:
    run = drive([EHLO + TXN + b"partial\r\n"], timeout_at_end=True)
    assert run.envelopes == []
    assert ("timeout", "in DATA", "", 421) in run.session.events


def test_timeout_in_helo_session_is_plain() -> None:
    run = drive([b"HELO c\r\n"], timeout_at_end=True)
    assert run.out.endswith(R.plain(R.R421_TIMEOUT % b"mx.example"))
    assert run.out.endswith(b"421 mx.example Error: timeout exceeded\r\n")
