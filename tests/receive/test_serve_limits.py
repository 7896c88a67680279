"""smapq serve's limits, each with its RFC reply and its event: connections per client,
sessions in all, connections per minute, session lifetime, memory per session, and a
slow client that must not stall the others."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from smapq.smtp import replies as R
from tests.receive.conftest import Rig

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

STRICT = "smap: exemptloopback off\n"  # the tests' clients are all on loopback


def refused(rig: Rig, reason: str) -> list[tuple[object, ...]]:
    return rig.rows(
        "SELECT kind, code, detail FROM events WHERE session_id IN "
        "(SELECT session_id FROM events WHERE kind = 'reject' AND detail LIKE :reason)"
        " ORDER BY id",
        reason=f"%{reason}%",
    )


def test_connections_per_client(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(STRICT + "smap: maxperclient 2\n", kind="serve")
    a, b = rig.client(), rig.client()
    c = rig.client(banner=False)
    assert c.reply() == b"421 4.7.0 %s Error: too many connections from 127.0.0.1\r\n" % (
        rig.hostname()
    )
    assert c.eof()
    b.cmd(b"QUIT")
    assert b.eof()
    rig.wait_sessions(1)
    d = rig.client()  # room again once one left
    assert d.cmd(b"QUIT") == R.plain(R.R221_BYE)
    a.cmd(b"QUIT")
    assert refused(rig, "too many connections from 127.0.0.1") == [
        ("connect", 421, None),
        ("reject", 421, "too many connections from 127.0.0.1 (2)"),
        ("disconnect", None, "too many connections from 127.0.0.1 (2)"),
    ]
    assert rig.rows("SELECT count(*) FROM events WHERE kind = 'connect'") == [(4,)]


def test_sessions_in_all(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: maxsessions 2\n", kind="serve")
    rig.client()
    rig.client()
    c = rig.client(banner=False)
    assert c.reply() == b"421 4.7.0 %s Error: too many connections, try again later\r\n" % (
        rig.hostname()
    )
    assert c.eof()
    for client in rig.clients:
        client.close()
    assert [r[:2] for r in refused(rig, "too many sessions")] == [
        ("connect", 421),
        ("reject", 421),
        ("disconnect", None),
    ]


def test_connections_per_minute(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(STRICT + "smap: clientrate 3\n", kind="serve")
    for _ in range(3):
        c = rig.client()
        assert c.cmd(b"QUIT") == R.plain(R.R221_BYE)
    c = rig.client(banner=False)
    assert c.reply() == (
        b"421 4.7.0 %s Error: too many connections per minute from 127.0.0.1\r\n" % rig.hostname()
    )
    assert c.eof()
    assert [r[:2] for r in refused(rig, "per minute")] == [
        ("connect", 421),
        ("reject", 421),
        ("disconnect", None),
    ]


def test_loopback_is_exempt_from_the_per_client_limits(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory("smap: maxperclient 1\nsmap: clientrate 1\n", kind="serve")
    clients = [rig.client() for _ in range(3)]  # all greeted: loopback is exempt
    for c in clients:
        assert c.cmd(b"QUIT") == R.plain(R.R221_BYE)
    assert rig.rows("SELECT count(*) FROM events WHERE kind = 'reject'") == [(0,)]


@pytest.mark.parametrize("transport", ["inetd", "serve"])
def test_session_lifetime(rig_factory: Callable[..., Rig], transport: str) -> None:
    rig = rig_factory("smap: sessiontime 2\nsmap: timeout 60\n", kind=transport)
    c = rig.client()
    c.cmd(b"EHLO c")
    replies = []
    for _ in range(40):  # busy, never idle: only the lifetime can end it
        reply = c.cmd(b"NOOP")
        replies.append(reply)
        if not reply.startswith(b"250"):
            break
        time.sleep(0.25)
    assert replies[-1] == R.R421_LIFETIME % rig.hostname()
    assert c.eof()
    assert rig.rows("SELECT kind, code FROM events WHERE kind = 'expire'") == [("expire", 421)]
    assert rig.rows("SELECT detail FROM events WHERE kind = 'disconnect'") == [
        ("session time limit",)
    ]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_per_session_is_bounded(rig_factory: Callable[..., Rig]) -> None:
    """Three clients each push 48 MB at a 1 MB maxbytes: one endless command line, one
    message far over the limit, one body line that never ends.  The worker's memory
    grows by a few MB at most, and all three get their refusals."""
    rig = rig_factory("smap: maxbytes 1m\n", kind="serve")
    (worker,) = rig.server.children(running=True)
    line, big, long_line = rig.client(), rig.client(), rig.client()
    for c in (big, long_line):
        c.cmd(b"EHLO c")
        c.cmd(b"MAIL FROM:<a@b.c>")
        c.cmd(b"RCPT TO:<d@e.f>")
        assert c.cmd(b"DATA") == R.R354_DATA
    before = rss(worker)
    chunk = b"x" * (1 << 20)
    for _ in range(48):
        line.send(chunk)
        big.send(b"".join(b"y" * 78 + b"\r\n" for _ in range(13000)))
        long_line.send(chunk)
    grown = rss(worker) - before
    assert line.cmd(b"") == R.plain(R.R500_COMMAND_TOO_LONG)
    assert big.cmd(b".") == R.R552_TOO_BIG
    assert long_line.cmd(b"\r\n.") == R.R500_DATA_LINE_TOO_LONG
    assert grown < 16 * (1 << 20), f"worker grew by {grown} bytes"
    for c in (line, big, long_line):
        c.close()
    assert rig.rows("SELECT count(*) FROM messages") == [(0,)]


def test_a_slow_client_does_not_stall_the_others(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory("smap: timeout 60\n", kind="serve")
    slow = rig.client()
    slow.cmd(b"EHLO slow")
    slow.send(b"MAIL FROM:<slow@")  # half a command, then nothing for a long while
    stalled = rig.client(rcvbuf=4096)  # and one that stops reading mid-message
    stalled.cmd(b"EHLO stalled")
    stalled.cmd(b"MAIL FROM:<s@b.c>")
    stalled.cmd(b"RCPT TO:<d@e.f>")
    stalled.cmd(b"DATA")
    stalled.send(b"z" * 500_000)
    for i in range(20):
        c = rig.client()
        c.cmd(b"EHLO fast")
        c.cmd(b"MAIL FROM:<fast@b.c>")
        c.cmd(b"RCPT TO:<d@e.f>")
        c.cmd(b"DATA")
        assert c.cmd(b"%d\r\n." % i).startswith(b"250 ")
        assert c.cmd(b"QUIT") == R.R221_BYE
    slow.send(b"b.c>\r\n")
    assert slow.reply() == R.R250_SENDER_OK % b"<slow@b.c>"
    slow.cmd(b"QUIT")
    stalled.close()
    assert rig.rows("SELECT count(*) FROM messages WHERE mail_from = 'fast@b.c'") == [(20,)]
