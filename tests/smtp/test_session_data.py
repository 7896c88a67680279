"""End of data, SMTP smuggling and byte-exact dot-unstuffing."""

from __future__ import annotations

import pytest

from smapq.smtp import replies as R
from tests.smtp.sessiondrive import banner, drive, ehlo_reply

EHLO = b"EHLO c\r\n"
TXN = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
TXN_OUT = R.R250_SENDER_OK % b"<a@b.c>" + R.R250_RCPT_OK % b"<d@e.f>" + R.R354_DATA
START = banner() + ehlo_reply(b"c")

SMUGGLED = (
    b"MAIL FROM:<admin@victim.example>\r\n"
    b"RCPT TO:<target@victim.example>\r\n"
    b"DATA\r\n"
    b"From: admin@victim.example\r\n\r\nsmuggled\r\n"
)

# Fake ends of data that some server somewhere has taken for the real one.
FAKE_ENDS = [
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
]


@pytest.mark.parametrize("fake", FAKE_ENDS, ids=[repr(f) for f in FAKE_ENDS])
def test_smuggling_variants_never_end_data(fake: bytes) -> None:
    data = EHLO + TXN + b"Subject: hi\r\n\r\nhello" + fake + SMUGGLED + b".\r\nNOOP\r\n"
    whole = drive([data])
    if b"\x00" in fake:
        # A NUL is not a newline, and no NUL is taken in message data (RFC 5322): the
        # whole of it is one refused message, nothing of it ran as commands.
        assert whole.out == START + TXN_OUT + R.R550_NUL + R.R250_OK
        assert whole.envelopes == []
        return
    assert whole.out == START + TXN_OUT + R.R550_BARE_NEWLINE + R.R250_OK
    assert whole.envelopes == []
    kinds = [e[0] for e in whole.session.events]
    assert kinds.count("mail") == 1  # only the real MAIL FROM:<a@b.c>
    assert ("reject", "bare CR or LF in message data", "a@b.c", 550) in whole.session.events
    for i in range(len(data) + 1):
        assert drive([data[:i], data[i:]]).out == whole.out, i


def test_stuffed_fake_end_is_content() -> None:
    data = EHLO + TXN + b"hello\r\n..\r\n" + SMUGGLED + b".\r\n"
    run = drive([data])
    assert run.out == START + TXN_OUT + R.R250_ACCEPTED % b"Q1"
    assert run.envelopes[0].body == b"hello\r\n.\r\n" + SMUGGLED


def test_bare_lf_just_before_the_real_end() -> None:
    run = drive([EHLO + TXN + b"hello\n\r\n.\r\n"])
    assert run.out == START + TXN_OUT + R.R550_BARE_NEWLINE


def test_bare_cr_alone() -> None:
    run = drive([EHLO + TXN + b"a\rb\r\n.\r\n"])
    assert run.out == START + TXN_OUT + R.R550_BARE_NEWLINE


def test_real_end_split_across_feeds_after_a_bare_cr() -> None:
    run = drive([EHLO + TXN + b"a\r", b"\r\n.", b"\r\nNOOP\r\n"])
    assert run.out == START + TXN_OUT + R.R550_BARE_NEWLINE + R.R250_OK


# (wire data before the final ".\r\n", stored body)
UNSTUFF = [
    (b"", b""),
    (b"\r\n", b"\r\n"),
    (b"..\r\n", b".\r\n"),
    (b"...\r\n", b"..\r\n"),
    (b"....\r\n", b"...\r\n"),
    (b".x\r\n", b"x\r\n"),  # RFC 5321 4.5.2: the first "." of any line goes
    (b"x.\r\n", b"x.\r\n"),
    (b"x..\r\n", b"x..\r\n"),
    (b" .\r\n", b" .\r\n"),
    (b"\t..\r\n", b"\t..\r\n"),
    (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
    (b"..\r\n..\r\n..\r\n", b".\r\n.\r\n.\r\n"),
    (b"\r\n\r\n..\r\n\r\n", b"\r\n\r\n.\r\n\r\n"),
    (b"..\xff\xfe\r\n", b".\xff\xfe\r\n"),
    (b"\x01.\r\n", b"\x01.\r\n"),
    (b"a.b.c\r\n...d\r\n", b"a.b.c\r\n..d\r\n"),
    (b"no final newline", b"no final newline\r\n"),  # the CRLF of ".\r\n" ends it
    (b"..\r\n.\r\n", b".\r\n"),  # stops at the first <CRLF>.<CRLF>
]


@pytest.mark.parametrize(("wire", "body"), UNSTUFF, ids=[repr(w) for w, _ in UNSTUFF])
def test_dot_unstuffing_is_byte_exact(wire: bytes, body: bytes) -> None:
    if wire == b"no final newline":
        data = EHLO + TXN + wire + b"\r\n.\r\n"
    else:
        data = EHLO + TXN + wire + b".\r\n"
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        run = drive(chunks)
        assert [e.body for e in run.envelopes] == [body]
        assert run.envelopes[0].size == len(body)


def test_binary_8bit_body_is_kept() -> None:
    body = bytes(b for b in range(256) if b not in (0, 10, 13)) + b"\r\n"  # not NUL
    run = drive(
        [
            EHLO
            + b"MAIL FROM:<a@b.c> BODY=8BITMIME\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
            + body
            + b".\r\n"
        ]
    )
    assert run.envelopes[0].body == body
    assert run.envelopes[0].params == {"BODY": "8BITMIME"}


def test_large_message_in_small_chunks() -> None:
    body = b"".join(
        b"line %06d ........................................\r\n" % i for i in range(5000)
    )
    wire = body.replace(b"\r\n.", b"\r\n..")
    data = EHLO + TXN + wire + b".\r\n"
    chunks = [data[i : i + 1460] for i in range(0, len(data), 1460)]
    run = drive(chunks)
    assert run.envelopes[0].body == body
