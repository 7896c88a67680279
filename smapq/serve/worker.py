"""A serving process of ``smapq serve``: pre-jail init, the jail, the event loop.

Purpose: the supervisor (smapq.serve.supervisor) forks one worker per ``--workers``;
each runs the same start order as the inetd receiver -- read the netperm-table as
root, open the log, import everything, confine itself (smapq.sandbox: no process it
runs can reach another of its uid), chroot into the spool, setgroups([]), drop to
smap's uid/gid and verify (smapq.receive.jail, the same code) -- then opens the queue
inside the jail and serves the listening sockets it inherited with an event loop:
many sessions, one writer process (smapq.serve.writer).  A PostgreSQL queue is the
writer's: it is forked before the jail, connects, then jails itself; while it cannot
connect, new sessions get 421 4.3.0 at the banner and the worker stays (the writer
keeps trying; the mail flows again as soon as it is connected).

Limits: at the door, ``maxsessions`` / ``maxperclient`` / ``clientrate`` (counted for
the whole server in smapq.serve.anvil; loopback clients skip the per-client ones
unless ``exemptloopback off``) answer 421 4.7.0 and close; in the session, the idle
``timeout`` and the ``sessiontime`` limit answer 421 4.4.2.  A sweep once a second
enforces the timers, so no timer is armed per read.

Stopping (SIGTERM): stop accepting at once, let sessions finish for ``grace``
seconds, then answer 421 4.3.2 to the rest; messages already handed to the writer
are committed and answered first (the core defers the end until then).  The worker
exits 0 once every connection is gone and the writer has written everything.

Security: runs as root only until the jail; SIGHUP is the supervisor's business
(it starts new workers with the re-read table and stops this one as above).

Diagnostics: the intake's log lines; worker start and stop lines; exit 75 when the
queue cannot be opened, 77 when the jail fails, 78 on a bad table.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

from smapq import sandbox
from smapq.config.settings import load
from smapq.config.tls import server_context
from smapq.errors import EX_CONFIG, EX_SOFTWARE, EX_TEMPFAIL, ConfigError
from smapq.intake.audit import LOG_CRIT, LOG_ERR, LOG_INFO, LOG_WARNING
from smapq.intake.core import Site, pre_jail_init
from smapq.intake.port import StoreError
from smapq.receive import jail
from smapq.receive.logsink import LogSink, crash_report, sink_or_none
from smapq.serve import anvil as A
from smapq.serve.connection import LINGER, Connection
from smapq.serve.writer import RETRY_OPEN, ProcessCommitter, sqlite_opener
from smapq.smtp import replies as R
from smapq.store import intake_open
from smapq.store.intake_sqlite import free_space

if TYPE_CHECKING:
    from collections.abc import Callable
    from ssl import SSLContext

    from smapq.config.settings import SmapSettings
    from smapq.intake.port import IntakeStore

SWEEP = 1.0  # seconds between timer checks
BACKLOG = 1024
_LOOPBACK = ("127.", "::1")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop: uvloop when installed (``auto``) or asked for, else asyncio's."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop  # noqa: PLC0415
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Worker:
    """One serving process's state: settings, sessions, writer, limits."""

    def __init__(
        self,
        smap: SmapSettings,
        site: Site,
        log: LogSink,
        anvil: A.Anvil,
        slot: int,
        grace: float,
    ) -> None:
        self.smap = smap
        self.site = site
        self.log = log
        self.anvil = anvil
        self.slot = slot
        self.grace = grace
        self.hostname = site.hostname.encode("ascii", "replace")
        self.sessions: set[Connection] = set()
        self.writer: ProcessCommitter  # set by run_worker
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping_at = 0.0
        self.broken = False
        self.jail_note = (
            "" if smap.jail else f"jail off: not chrooted into {smap.directory} (smap: jail off)"
        )
        self.done: asyncio.Future[None] | None = None
        self.tls_ctx: SSLContext | None = None  # loaded as root, before the jail
        self.wait = float(smap.timeout) if smap.timeout > 0 else 300.0

    # --- admission ---
    def admit(self, conn: Connection, addr: str, now: float) -> tuple[bytes, str] | None:
        """Count ``conn`` in, or the 421 and reason that turn it away."""
        smap = self.smap
        if self.stopping_at:
            return R.R421_SHUTDOWN % self.hostname, "server shutting down"
        if self.writer.down:  # back by itself: the writer keeps trying (writer.py)
            return R.R421_UNAVAILABLE % self.hostname, self.writer.down
        exempt = smap.exemptloopback and addr.startswith(_LOOPBACK)
        if exempt or not (smap.maxperclient or smap.clientrate):
            conn.key = None
        else:
            conn.key = A.client_key(addr)
        verdict = self.anvil.admit(
            self.slot, conn.key, now, smap.maxsessions, smap.maxperclient, smap.clientrate
        )
        if verdict == A.OK:
            conn.counted = True
            return None
        who = addr.encode("ascii", "replace")
        if verdict == A.BUSY:
            return R.R421_BUSY % self.hostname, f"too many sessions ({smap.maxsessions})"
        if verdict == A.TOO_MANY:
            reason = f"too many connections from {addr} ({smap.maxperclient})"
            return R.R421_CLIENT_CONNECTIONS % (self.hostname, who), reason
        reason = f"too many connections per minute from {addr} ({smap.clientrate})"
        return R.R421_CLIENT_RATE % (self.hostname, who), reason

    def ended(self, conn: Connection) -> None:
        self.sessions.discard(conn)
        if conn.counted:
            conn.counted = False
            self.anvil.release(self.slot, conn.key)
        if self.stopping_at:
            self._maybe_done()

    # --- timers ---
    async def sweep(self) -> None:
        idle = float(self.smap.timeout) if self.smap.timeout > 0 else 0.0
        lifetime = float(self.smap.sessiontime)
        while True:
            await asyncio.sleep(SWEEP)
            now = time.monotonic()
            shutting = bool(self.stopping_at) and now >= self.stopping_at + self.grace
            for conn in list(self.sessions):
                intake = conn.intake
                if conn.closing_since:
                    if now - conn.closing_since > 2 * LINGER:  # close() did not finish
                        conn.abort()
                elif intake is None or intake.pending is not None or conn.tls_task:
                    continue  # a commit or a handshake (it has its own timeout) runs
                elif shutting:
                    conn.end(intake.shutdown())
                elif now - conn.started > lifetime:
                    conn.end(intake.expire())
                elif idle and now - conn.last > idle:
                    if conn.write_paused:  # our replies pile up unread: no 421 can go out
                        conn.drop("client stopped reading replies")
                    else:
                        conn.end(intake.timeout())
            if self.stopping_at:
                self._maybe_done()

    # --- stopping ---
    def writer_lost(self) -> None:
        """The queue writer died: nothing more can be accepted; end, to be replaced."""
        self.broken = True
        self.grace = 0.0
        self.stop()

    def stop(self) -> None:
        """SIGTERM: stop accepting, let sessions finish within ``grace``."""
        if self.stopping_at:
            return
        self.stopping_at = time.monotonic()
        for server in self.servers:
            server.close()
        self.log(LOG_INFO, f"stopping: {len(self.sessions)} sessions have {self.grace:.0f}s")
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.sessions or self.writer.outstanding:
            return
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


def _loop_error(worker: Worker, context: dict[str, object]) -> None:
    """What the event loop could not hand to anyone: logged, never printed."""
    exc = context.get("exception")
    text = crash_report(exc) if isinstance(exc, BaseException) else str(context.get("message"))
    worker.log(LOG_CRIT, text)


def _server_opener(smap: SmapSettings) -> Callable[[], tuple[IntakeStore, None]]:
    """The writer's store for a database server: connect as root, then jail."""

    def open_store() -> tuple[IntakeStore, None]:
        store = intake_open.before_jail(smap)
        assert store is not None
        try:
            jail.enter(smap.directory, smap.jail, smap.userid, smap.groupid)
        except BaseException:
            store.close()
            raise
        return store, None

    return open_store


def _site(smap: SmapSettings, log: LogSink, path: str, tls: bool) -> Site:
    directory = os.path.dirname(path) or "."
    return Site(
        smap.hostname or os.uname().nodename,
        smap.maxbytes,
        smap.maxrecip,
        smap.maxerrors,
        smap.reserve,
        sink_or_none(log),
        # A database server's disk is its own business: it answers 53100 when full.
        None if smap.database_is_url else lambda: free_space(directory),
        smap.strictpipelining,
        tls=tls,
        policy=smap.policy,
    )


def run_worker(
    table: str,
    sockets: list[socket.socket],
    anvil: A.Anvil,
    slot: int,
    grace: float,
    loop_kind: str,
) -> int:
    """The life of one worker process after the fork; returns its exit code."""
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # the supervisor's signals
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    log = LogSink("smap")
    try:
        smap = load(table).smap
        if smap.logfile:
            try:
                log.open_file(smap.logfile)
            except OSError as exc:
                raise ConfigError(f"cannot open {smap.logfile}: {exc.strerror}") from None
        # Confined before the loop exists: libuv then finds io_uring refused at once
        # and uses epoll alone; the writer forked later inherits the filter.
        sandbox.confine(hide=not smap.jail)
        loop = new_loop(loop_kind)
        committer = None
        if smap.database_is_url:  # the writer connects before the jail (writer.py)
            committer = ProcessCommitter(
                _server_opener(smap),
                lambda text: log(LOG_ERR, text),
                lambda: None,
                retry=RETRY_OPEN,
                on_back=lambda: log(LOG_INFO, "queue database reachable again"),
            )
            committer.fork(sockets)
        # As root, before the jail: the key file need not be readable inside it (and
        # after the writer's fork: the writer never holds the key).
        tls_ctx = server_context(smap) if smap.tlscert else None
        pre_jail_init(smap.policy)
        jail.enter(smap.directory, smap.jail, smap.userid, smap.groupid)
    except ConfigError as exc:
        log.failure(LOG_ERR, f"fwtkcfgerr: {exc}")
        return EX_CONFIG
    except (jail.JailError, sandbox.SandboxError) as exc:
        log.failure(LOG_CRIT, f"securityalert: {exc}")
        return exc.exit_code
    except StoreError as exc:
        log.failure(LOG_ERR, f"fwtksyserr: {exc.reason}")
        return EX_TEMPFAIL
    path = smap.database_in_jail
    worker = Worker(smap, _site(smap, log, path, tls_ctx is not None), log, anvil, slot, grace)
    worker.tls_ctx = tls_ctx
    if committer is None:
        committer = ProcessCommitter(
            sqlite_opener(path), lambda text: log(LOG_ERR, text), worker.writer_lost
        )
        committer.fork(sockets)  # jailed already; before the loop runs
    else:
        committer.on_lost = worker.writer_lost
    worker.writer = committer
    if worker.jail_note:
        log(LOG_WARNING, worker.jail_note)
    try:
        loop.run_until_complete(_serve(worker, loop, sockets))
    except Exception as exc:
        log.failure(LOG_CRIT, crash_report(exc))
        return EX_SOFTWARE
    return EX_TEMPFAIL if worker.broken else 0


async def _serve(
    worker: Worker, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket]
) -> None:
    await worker.writer.start(loop)
    worker.done = loop.create_future()
    loop.set_exception_handler(lambda _loop, ctx: _loop_error(worker, ctx))
    for sock in sockets:
        server = await loop.create_server(lambda: Connection(worker), sock=sock, backlog=BACKLOG)
        worker.servers.append(server)
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    sweeper = loop.create_task(worker.sweep())
    await worker.done
    sweeper.cancel()
    await worker.writer.stop()
