"""Fixtures for the receiver's acceptance tests: a spool and a real super-server.

``rig`` and ``any_rig`` run on each backend (see tests/conftest.py); a test that uses
``rig_factory`` directly runs on each backend when it also asks for ``backend``, on
SQLite otherwise."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, Spool, make_spool, program
from tests.receive.superserver import KINDS, SERVE, Client, SuperServer, installed, wait_until

ROOT = os.geteuid() == 0


class Rig:
    """A spool, the table smap reads, and a super-server that runs smap for it."""

    def __init__(self, spool: Spool, server: SuperServer) -> None:
        self.spool = spool
        self.server = server
        self.clients: list[Client] = []
        self.opened = 0  # sessions this test opened (rig.client() counts its own)

    def client(self, banner: bool = True, rcvbuf: int = 0) -> Client:
        c = Client(self.server.connect(rcvbuf=rcvbuf))
        self.clients.append(c)
        self.opened += 1
        if banner:
            greeting = c.reply()
            assert greeting.startswith(b"220 "), greeting
        return c

    def hostname(self) -> bytes:
        """The name in the banner (the tests' tables set none: the machine's)."""
        return os.uname().nodename.encode()

    def wait_sessions(self, n: int, timeout: float = 60) -> None:
        """Wait until smapq serve holds exactly ``n`` connections."""
        wait_until(lambda: self.server.established() == n, timeout, f"not {n} sessions")

    def idle(self, timeout: float = 120) -> None:
        """Wait until every session ended and wrote its last events: the client sees
        EOF before the session's last audit events are committed, by design (the
        client is let go first).  Under a super-server that is when no receiver
        runs; smapq serve keeps running, so then it is when the server holds no
        connection and every session the test opened has its connect and its
        disconnect event (its first and its last)."""
        if self.server.kind != SERVE:
            wait_until(lambda: not self.server.children(running=True), timeout, "a receiver runs")
            return
        wait_until(lambda: not self.server.established(), timeout, "a session is open")
        count = "SELECT count(*) FROM events WHERE kind = :kind"

        def ended() -> bool:
            rows = self.rows(count, wait=False, kind="connect") + self.rows(
                count, wait=False, kind="disconnect"
            )
            return rows[0] == rows[1] and rows[0][0] >= self.opened

        wait_until(ended, timeout, "a session's last events are not written")

    def rows(self, sql: str, wait: bool = True, **params: object) -> list[tuple[object, ...]]:
        """Query the queue database (``:name`` parameters), after every receiver has
        exited (unless ``wait``)."""
        if wait:
            self.idle()
        return self.spool.query(sql, **params)


def spool_for_receiver(root: Path, extra: str = "") -> Spool:
    """As root: smap jailed as nobody (production); otherwise jail off (a dev box)."""
    return make_spool(root, extra, user="nobody" if ROOT else None)


@pytest.fixture
def rig_factory(open_dir: Path) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []
    count = 0

    def make(
        extra: str = "",
        kind: str = "inetd",
        spool: Spool | None = None,
        serve_args: tuple[str, ...] = ("--grace", "2"),
    ) -> Rig:
        nonlocal count
        if not installed(kind):
            pytest.skip(f"{kind} is not installed (.ci/run installs it)")
        count += 1
        root = open_dir / f"rig{count}"
        root.mkdir(mode=0o755)
        spool = spool or spool_for_receiver(root, extra)
        if kind == SERVE:
            argv = [program("smapq"), "-t", str(spool.table), "serve", *serve_args]
        else:
            argv = [program("smap"), "-t", str(spool.table)]
        server = SuperServer(kind, argv, root)
        rigs.append(Rig(spool, server))
        return rigs[-1]

    try:
        yield make
    finally:
        for rig in rigs:
            for c in rig.clients:
                c.close()
        for rig in rigs:
            rig.server.stop()  # also kills a receiver a failed test left running


@pytest.fixture(params=[*KINDS, SERVE])
def any_rig(
    request: pytest.FixtureRequest, rig_factory: Callable[..., Rig], backend: Backend
) -> Rig:
    """The same rig under every super-server, and as smapq serve."""
    return rig_factory(kind=request.param)


TRANSPORTS = ("inetd", SERVE)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each transport of the intake: smap under inetd, and smapq serve."""
    return str(request.param)


@pytest.fixture
def rig(rig_factory: Callable[..., Rig], transport: str, backend: Backend) -> Rig:
    return rig_factory(kind=transport)
