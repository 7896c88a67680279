"""Property tests: the session never raises, replies are well formed, chunking is
irrelevant, and any body survives stuffing + unstuffing byte for byte."""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.smtp.sessiondrive import drive

REPLY_LINE = re.compile(rb"[2-5][0-5][0-9][ -][^\r\n]*")
# No deadline and no too_slow health check: on a loaded CI machine generating and
# running an example may take long, which says nothing about the session.
LOADED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKENS = [
    b"HELO c\r\n",
    b"EHLO c\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<> SIZE=20 BODY=8BITMIME\r\n",
    b"RCPT TO:<d@e.f>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY x\r\n",
    b"EXPN x\r\n",
    b"HELP\r\n",
    b"QUIT\r\n",
    b"x" * 600,
    b"y" * 1100 + b"\r\n",
]

smtpish = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=40)), max_size=40).map(
    b"".join
)


def check_replies(out: bytes) -> None:
    assert out.endswith(b"\r\n")
    lines = out.split(b"\r\n")[:-1]
    for line in lines:
        assert REPLY_LINE.fullmatch(line), line
    # A multi-line reply keeps its code and ends with a "DDD " line.
    for prev, line in itertools.pairwise(lines):
        if prev[3:4] == b"-":
            assert line[:3] == prev[:3]
    assert lines[-1][3:4] == b" "


@settings(LOADED, max_examples=400)
@given(
    data=smtpish,
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=6),
    max_bytes=st.sampled_from([-1, 0, 5, 50]),
    max_recipients=st.sampled_from([-1, 0, 1, 3]),
    timeout=st.booleans(),
)
def test_feed_never_raises_and_replies_are_valid(
    data: bytes, cuts: list[int], max_bytes: int, max_recipients: int, timeout: bool
) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    run = drive(chunks, max_bytes=max_bytes, max_recipients=max_recipients, timeout_at_end=timeout)
    check_replies(run.out)
    whole = drive(
        [data], max_bytes=max_bytes, max_recipients=max_recipients, timeout_at_end=timeout
    )
    assert run.out == whole.out
    assert run.envelope_facts() == whole.envelope_facts()
    assert run.session.events == whole.session.events
    for kind, detail, addr, code in run.session.events:
        assert isinstance(kind, str) and isinstance(detail, str) and isinstance(addr, str)
        assert isinstance(code, int)
    for env in run.envelopes:
        assert max_bytes < 0 or env.size <= max_bytes
        assert max_recipients < 0 or len(env.recipients) <= max_recipients


# Any octet but CR, LF (bare ones are refused) and NUL (refused: RFC 5322).
line_bytes = st.binary(max_size=60).map(lambda b: b.translate(None, b"\r\n\0"))


@settings(LOADED, max_examples=300)
@given(lines=st.lists(line_bytes, max_size=30), chunk=st.integers(min_value=1, max_value=64))
def test_any_body_round_trips(lines: list[bytes], chunk: int) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    data = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + wire + b".\r\n"
    run = drive([data[i : i + chunk] for i in range(0, len(data), chunk)])
    assert [e.body for e in run.envelopes] == [body]


@settings(LOADED, max_examples=200)
@given(data=smtpish, outcomes=st.lists(st.booleans(), max_size=8))
def test_storage_outcomes_in_any_order(data: bytes, outcomes: list[bool]) -> None:
    from smapq.smtp import replies as R
    from smapq.smtp.session import Session

    s = Session("mx.example")
    out = [s.greeting(), s.feed(data)]
    stored = failed = 0
    for ok in outcomes:
        if s.pending is None:
            break
        if ok:
            stored += 1
            out.append(s.stored(f"Q{stored}"))
        else:
            failed += 1
            out.append(s.store_failed(R.R451_STORE_FAILED, "busy"))
    check_replies(b"".join(out))
    kinds = [e[0] for e in s.events]
    assert kinds.count("accept") == stored
    assert sum(1 for e in s.events if e[0] == "reject" and e[1] == "busy") == failed
