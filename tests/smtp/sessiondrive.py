"""A minimal in-memory driver for smapq.smtp.session.Session, shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable

from smapq.smtp import replies as R
from smapq.smtp.session import Envelope, Session

HOST = "mx.example"


class Run:
    """What one driven session produced."""

    def __init__(self, session: Session, out: bytes, envelopes: list[Envelope]) -> None:
        self.session = session
        self.out = out
        self.envelopes = envelopes

    def lines(self) -> list[bytes]:
        return self.out.split(b"\r\n")[:-1]

    def codes(self) -> list[int]:
        return [int(line[:3]) for line in self.lines() if line[3:4] == b" "]

    def envelope_facts(self) -> list[tuple[object, ...]]:
        return [
            (e.sender, tuple(e.recipients), e.body, e.helo, e.protocol, e.size, e.params)
            for e in self.envelopes
        ]


def drive(chunks: Iterable[bytes], *, timeout_at_end: bool = False, **kw: int) -> Run:
    """Feed ``chunks`` one by one; every pending message is 'stored' as Q1, Q2, ..."""
    s = Session(HOST, **kw)
    out = [s.greeting()]
    envs: list[Envelope] = []
    for chunk in chunks:
        out.append(s.feed(chunk))
        while s.pending is not None:
            envs.append(s.pending)
            out.append(s.stored(f"Q{len(envs)}"))
    if timeout_at_end:
        out.append(s.timeout())
    return Run(s, b"".join(out), envs)


def banner() -> bytes:
    return R.R220_BANNER % HOST.encode()


def ehlo_reply(helo: bytes = b"client.example", size: bytes = R.EHLO_SIZE) -> bytes:
    return R.R250_EHLO % (HOST.encode(), helo, size)
