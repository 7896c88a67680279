"""One SMTP connection of ``smapq serve``: bytes between a socket and the intake core.

Purpose: the listener's transport.  An asyncio ``BufferedProtocol`` per connection;
the loop reads into one receive buffer shared by every connection of the worker
(asyncio and uvloop call ``get_buffer`` and ``buffer_updated`` back to back, and the
session copies what it keeps), so an idle connection costs no read buffer and a busy
one allocates nothing per read.  No coroutine per command: the core answers each
``buffer_updated`` synchronously; only the commit leaves the loop (smapq.serve.
writer), and while it is on its way this connection stops reading.

Memory per session is bounded: the session keeps at most about 4/3 of maxbytes of a
message (smapq.smtp.session), reading pauses while a commit is outstanding and while
the client does not read our replies (``pause_writing``), and the idle timeout ends a
client that stalls either way.  A slow client therefore costs its own memory and
never the others' time.

Closing is graceful (as the inetd receiver's): after the last reply the write side
is shut down, further input is read and dropped until the client closes or LINGER
seconds pass, so a client that is still sending does not turn our close into a
reset that destroys the reply it has not read yet.

STARTTLS: when the core says ``tls_wait`` (it answered 220 to STARTTLS and dropped
whatever was pipelined behind it), reading stops at once, so no byte of the client's
handshake is taken as SMTP text, and the loop's ``start_tls`` runs the handshake
(asyncio/uvloop's SSL protocol); the new transport replaces the plain one and the
core hears ``tls_started`` or ``tls_failed``.

Security: nothing from the client reaches anything but the session; every reply and
every event is the core's.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from smapq.intake.audit import LOG_CRIT
from smapq.intake.core import Intake
from smapq.receive.logsink import crash_report
from smapq.smtp import replies as R

if TYPE_CHECKING:
    from smapq.intake.port import StoreError
    from smapq.serve.worker import Worker

# After the last reply: drain the client's input this long at most, and stop as soon
# as it has been quiet for LINGER_QUIET (it read our reply and waits for our close).
LINGER = 2.0
LINGER_QUIET = 0.1
BUFFER_SIZE = 65536
_BUFFER = bytearray(BUFFER_SIZE)
_VIEW = memoryview(_BUFFER)


def _tls_reason(exc: Exception) -> str:
    """What went wrong in a handshake, for the tls event."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "client dropped connection"
    return (str(exc) or type(exc).__name__)[:200]


def _peer(transport: asyncio.BaseTransport) -> tuple[str, int]:
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return "", 0
    host = str(peer[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]  # an IPv4 client on a dual-stack socket
    return host, int(peer[1])


class Connection(asyncio.BufferedProtocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "closing_since",
        "counted",
        "intake",
        "key",
        "last",
        "peer_eof",
        "started",
        "tls_task",
        "transport",
        "worker",
        "write_paused",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.intake: Intake | None = None
        self.key: bytes | None = None
        self.counted = False
        self.started = self.last = 0.0
        self.closing_since = 0.0
        self.peer_eof = False
        self.write_paused = False
        self.tls_task: asyncio.Task[None] | None = None

    # --- asyncio protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: trust the duck.
        self.transport = transport = cast("asyncio.Transport", transport)
        worker = self.worker
        addr, port = _peer(transport)
        intake = self.intake = Intake(worker.site, addr, port)
        if worker.jail_note:  # as the inetd receiver notes it in every session
            intake.note("jail", worker.jail_note)
        now = self.started = self.last = time.monotonic()
        refusal = worker.admit(self, addr, now)
        if refusal is not None:
            transport.write(intake.refuse(*refusal))
            self.hang_up()
            return
        worker.sessions.add(self)
        transport.write(intake.greeting())

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    def buffer_updated(self, nbytes: int) -> None:
        intake = self.intake
        assert intake is not None
        self.last = time.monotonic()
        if self.closing_since:
            return  # draining after the last reply
        try:
            self._after(intake.feed(_VIEW[:nbytes]))
        except Exception as exc:  # a bug: this session ends with 421, the others go on
            self.crashed(exc)

    def crashed(self, exc: Exception) -> None:
        """An internal error in this session: log it, 421, close; never a traceback."""
        self.worker.log(LOG_CRIT, crash_report(exc))
        if self.transport is not None:
            self.transport.write(R.R421_UNAVAILABLE % self.worker.hostname)
            self.hang_up()

    def eof_received(self) -> bool:
        self.peer_eof = True
        intake = self.intake
        if self.closing_since:
            self._close()  # it read our last reply and left: the drain is over
        elif intake is not None and intake.pending is None:
            intake.eof()
            self._close()
        # We close, once any commit in flight has been answered; a TLS transport closes
        # itself at EOF whatever we say (and warns about a True).
        transport = self.transport
        return transport is None or transport.get_extra_info("ssl_object") is None

    def pause_writing(self) -> None:
        # The client does not read our replies: stop reading its commands until it does.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        intake = self.intake
        if (
            self.transport is not None
            and intake is not None
            and intake.pending is None
            and self.tls_task is None
        ):
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        intake = self.intake
        if intake is None:
            return
        if not intake.closed:
            intake.eof()  # deferred by the core while a commit is in flight
        self.worker.ended(self)
        if intake.pending is None:
            self._flush_all()

    # --- the intake's outcomes ---
    def _after(self, out: bytes) -> None:
        """Send ``out``; hand a pending message to the writer; close when done."""
        intake = self.intake
        transport = self.transport
        assert intake is not None
        if intake.pending is not None:
            if transport is not None:
                transport.pause_reading()
            self.worker.writer.submit(intake.pending, self)
        if transport is None:
            return
        if out:
            transport.write(out)
        if intake.closed:
            self.hang_up()
        elif intake.tls_wait:
            transport.pause_reading()  # the next bytes are the client's TLS handshake
            self.tls_task = asyncio.get_running_loop().create_task(self._starttls(transport))
        elif intake.pending is None:
            loose = intake.loose()
            if loose is not None:
                self.worker.writer.log(loose)

    def committed(self, error: StoreError | None) -> None:
        """The writer's outcome for our pending message (in the loop's thread)."""
        intake = self.intake
        assert intake is not None
        try:
            self._after(intake.committed(error))
        except Exception as exc:
            self.crashed(exc)
            return
        if intake.pending is not None:
            return
        if self.transport is None:  # the client left while its message was committed
            self._flush_all()
        elif self.peer_eof and not self.closing_since:
            intake.eof()
            self._close()
        elif not intake.closed and not self.write_paused and self.tls_task is None:
            self.transport.resume_reading()

    async def _starttls(self, plain: asyncio.Transport) -> None:
        """The handshake on the loop; the TLS transport replaces ``plain``."""
        intake, worker = self.intake, self.worker
        assert intake is not None and worker.tls_ctx is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                plain,
                self,
                worker.tls_ctx,
                server_side=True,
                ssl_handshake_timeout=worker.wait,
            )
        except Exception as exc:  # a failed handshake ends this session only
            intake.tls_failed(_tls_reason(exc))
            self.tls_task = None
            plain.abort()
            self.connection_lost(None)  # the SSL protocol may not tell us
            return
        self.tls_task = None
        if transport is None or self.transport is None:  # gone meanwhile
            return
        self.transport = transport
        obj = transport.get_extra_info("ssl_object")
        cipher = obj.cipher() if obj is not None else None
        version = obj.version() if obj is not None else ""
        try:
            self._after(intake.tls_started(version or "", cipher[0] if cipher else ""))
        except Exception as exc:
            self.crashed(exc)
            return
        if not intake.closed and not self.write_paused:
            transport.resume_reading()

    def end(self, out: bytes) -> None:
        """Send the core's last word (timeout, session limit, shutdown) and close."""
        if self.transport is not None and out:
            self.transport.write(out)
        self.hang_up()

    # --- closing ---
    def hang_up(self) -> None:
        """Shut down writing after the last reply, then drain (see the docstring)."""
        transport = self.transport
        if transport is None or self.closing_since:
            return
        self.closing_since = time.monotonic()
        if self.peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.resume_reading()
        self.last = self.closing_since
        asyncio.get_running_loop().call_later(LINGER_QUIET, self._linger)

    def _linger(self) -> None:
        transport = self.transport
        if transport is None:
            return
        now = time.monotonic()
        if now - self.last >= LINGER_QUIET or now - self.closing_since >= LINGER:
            transport.close()
        else:
            asyncio.get_running_loop().call_later(LINGER_QUIET, self._linger)

    def _close(self) -> None:
        if self.transport is not None:
            self.closing_since = self.closing_since or time.monotonic()
            self.transport.close()

    def drop(self, detail: str) -> None:
        """Give up on a client that does not read: no last word, the connection reset."""
        if self.intake is not None:
            self.intake.eof(detail)
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _flush_all(self) -> None:
        intake = self.intake
        assert intake is not None
        loose = intake.loose(everything=True)
        if loose is not None:
            self.worker.writer.log(loose)
