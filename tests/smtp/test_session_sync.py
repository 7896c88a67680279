"""Unauthorised pipelining (strict_sync): what a client may send ahead of our reply.

RFC 2920 3.1: with PIPELINING (offered in EHLO's reply) a client may send a group of
commands without waiting, but EHLO, DATA, VRFY, EXPN and NOOP end a group; without
EHLO there is no pipelining at all.  Postfix's smtpd_forbid_unauth_pipelining (on by
default since 3.9) answers 554 5.5.0 and disconnects; so does the session with
``strict_sync``.  A client that waits for every reply never trips it, however the
network splits its bytes.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from smapq.smtp import replies as R
from smapq.smtp.session import Session
from tests.smtp.sessiondrive import HOST

BODY = b"Subject: x\r\n\r\nhello\r\n.\r\n"


def feed_all(chunks: list[bytes]) -> tuple[Session, bytes]:
    s = Session(HOST, strict_sync=True)
    out = s.greeting()
    for chunk in chunks:
        out += s.feed(chunk)
        while s.pending is not None:
            out += s.stored("Q1")
    return s, out


def test_a_client_that_waits_for_each_reply_is_served() -> None:
    lines = [b"HELO c\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n"]
    _, out = feed_all([*lines, BODY, b"QUIT\r\n"])
    assert R.R554_SYNC not in out and R.plain(R.R554_SYNC) not in out
    assert out.endswith(R.plain(R.R221_BYE))


def test_an_esmtp_group_ending_in_data_is_fine_and_so_is_a_group_after_the_dot() -> None:
    group = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
    _, out = feed_all([b"EHLO c\r\n", group, BODY + group, BODY + b"QUIT\r\n"])
    assert out.count(b"250 2.0.0 Mail accepted") == 2
    assert out.endswith(R.R221_BYE)


def test_each_command_that_must_end_a_group() -> None:
    for verb in (b"NOOP", b"VRFY x", b"EXPN x", b"EHLO c", b"HELO c"):
        s, out = feed_all([b"EHLO c\r\n", verb + b"\r\nRSET\r\n"])
        assert out.endswith((R.R554_SYNC, R.plain(R.R554_SYNC))), verb
        assert s.closed
        reject = [e for e in s.events if e[0] == "reject"]
        assert reject[-1][1] == "improper command pipelining after " + verb.split()[0].decode()


def test_without_strict_sync_everything_pipelines() -> None:
    s = Session(HOST)
    out = s.greeting() + s.feed(b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n")
    assert out.count(b"250 ") == 3


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_how_the_bytes_of_one_waited_for_command_are_split_does_not_matter(
    cuts: list[int],
) -> None:
    """A command fed in pieces (the client waits for its reply) is never 'ahead'."""
    s = Session(HOST, strict_sync=True)
    s.greeting()
    for command in (b"EHLO client.example\r\n", b"MAIL FROM:<a@b.c>\r\n", b"NOOP\r\n"):
        pos = 0
        for cut in cuts:
            if pos >= len(command):
                break
            s.feed(command[pos : pos + cut])
            pos += cut
        if pos < len(command):
            s.feed(command[pos:])
        assert not s.closed
