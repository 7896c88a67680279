"""``smap`` (= ``smapq receive``): the inetd transport of the intake.

Purpose: inetd, xinetd or systemd (``Accept=yes``) starts one ``smap`` per SMTP
connection with the socket on fd 0 and 1.  This module only moves bytes between the
socket and the intake core (smapq.intake.core), keeps the idle timer and commits each
message through the intake backend (SQLite, or PostgreSQL for a ``postgresql+psycopg://``
database; smapq.store.intake_open picks it) before the core answers 250.  Usage:
``smap [-t netperm-table]``; ``smap -daemon [...]`` is FWTK 2.1's spelling of
``smapq serve`` (smapq.serve).

Start order (Postfix's pre-jail / post-jail seam), all before the banner:
  pre-jail, as root: keep stderr off the wire; open the log (smapq.receive.logsink:
  syslog with LOG_NDELAY so /dev/log survives the chroot, ``smap: logfile``); read the
  netperm-table (refused when others may write it) and resolve the smap uid/gid; every
  module the session needs is imported at the top of this file, because nothing
  outside the jail can be imported later; read the peer from getpeername(0) or
  $REMOTE_ADDR/$REMOTE_PORT.
  confine (smapq.sandbox): no_new_privs and a seccomp filter, so nothing this process
  runs can ptrace, signal or write another process of its uid.
  jail (smapq.receive.jail): chroot(directory) -> chdir / -> setgroups([]) ->
  setgid -> setuid, then setuid(0) must fail.  ``smap: jail off`` skips the chroot
  and the receiver says so (stderr when stderr is not the connection, and the log).
  A PostgreSQL database is connected to after confine and before the jail (the
  chroot hides its Unix socket and libpq's files); no connection: 421 4.3.0.
  post-jail, as the smap uid: open the SQLite database by its path inside the jail;
  then the 220 banner.

Security: the client never sees a traceback.  When stderr is the connection (inetd
dups the socket onto fd 0, 1 and 2; so does systemd's default StandardError=inherit)
it is pointed at /dev/null first.  Any failure before the banner answers ``421`` and
exits, and its reason is logged (to FALLBACK_LOG when there is no other log); an
internal error after it answers ``421`` too and is logged with its stack.  The
connection is closed gracefully: after the last reply the write side is shut down and
unread input drained briefly, so a client still sending cannot turn our close into a
reset that destroys the last reply in flight.

Diagnostics: the intake core's log lines (smapq.intake.audit) and ``fwtkcfgerr:`` /
``fwtksyserr:`` / ``securityalert:`` lines for failures here.

Exit codes: 0 after a session; 64 usage; 75 database unavailable; 77 jail failure;
78 configuration error; 70 internal error.

Lean: stdlib only, no re/enum/typing/logging/SQLAlchemy (HACKING.md); checked by
tests/test_layout.py.
"""

from __future__ import annotations

import os
import select
import sys
import time

from smapq import sandbox
from smapq.config.netperm import table_path
from smapq.config.settings import load
from smapq.config.tls import server_context
from smapq.errors import EX_CONFIG, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE, ConfigError
from smapq.intake.audit import LOG_CRIT, LOG_ERR, LOG_WARNING
from smapq.intake.core import Intake, Site, pre_jail_init
from smapq.intake.port import StoreError
from smapq.receive import jail
from smapq.receive.logsink import LogSink, crash_report, sink_or_none
from smapq.receive.tls import MemoryTls, TlsError
from smapq.smtp import replies as R
from smapq.store import intake_open

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ssl import SSLContext

    from smapq.intake.port import IntakeStore, Submission

USAGE = "usage: smap [-t netperm-table] | smap -daemon [smapq serve options]\n"
HELP = (
    USAGE + "\nThe SMTP receiver, started by inetd per connection with the socket on fd 0/1.\n"
    "-t PATH  the netperm-table (default: $SMAPQ_TABLE, else "
    "/usr/local/etc/netperm-table)\n"
    "-daemon  run as a standalone listener instead (smapq serve; see smapq serve --help)\n"
)
READ_SIZE = 65536
# After the last reply: how long, and how much, unread input is drained before close;
# draining ends early once the client is quiet that long (it read our reply and waits).
LINGER_SECONDS = 2.0
LINGER_QUIET = 0.1
LINGER_BYTES = 1 << 20


def _say(text: str) -> None:
    """One line on stderr, which _protect_stderr made safe (never the connection)."""
    try:  # noqa: SIM105  (contextlib is an import the receiver need not pay)
        os.write(2, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _protect_stderr() -> None:
    """Point fd 2 at /dev/null when it is the connection (inetd dups the socket there)."""
    try:
        err = os.fstat(2)
        conn = os.fstat(0)
    except OSError:
        return
    if (err.st_dev, err.st_ino) == (conn.st_dev, conn.st_ino):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)


def _parse_args(argv: list[str]) -> str | None:
    """The -t argument; raises ValueError(message) on bad usage."""
    table = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-t", "--table"):
            if not args:
                raise ValueError(f"{arg} needs a file name")
            table = args.pop(0)
        elif arg.startswith("--table="):
            table = arg[8:]
        elif arg in ("-h", "--help"):
            raise ValueError("")
        else:
            raise ValueError(f"unknown argument {arg!r}")
    return table


class InetdReceiver:
    """One SMTP connection on fd 0/1 from start-up to exit."""

    __slots__ = (
        "closed_fds",
        "deadline",
        "hostname",
        "intake",
        "log",
        "stalled",
        "store",
        "tls",
        "tls_ctx",
        "wait",
    )

    def __init__(self) -> None:
        self.hostname = os.uname().nodename
        self.log = LogSink("smap")
        self.intake: Intake | None = None
        self.store: IntakeStore | None = None
        self.wait: float | None = None  # smap: timeout, None for none (FWTK's 0)
        self.stalled = False
        self.closed_fds = False
        self.deadline = 0.0  # end of the session (smap: sessiontime), monotonic
        self.tls_ctx: SSLContext | None = None  # smap: tlscert/tlskey, loaded as root
        self.tls: MemoryTls | None = None  # on after a STARTTLS handshake

    # --- start-up ---
    def start(self, table: str | None) -> None:
        """Pre-jail init, the jail, post-jail init; raises on any refusal."""
        if not self.log.syslog_on:
            _say("smap: /dev/log is missing: syslog is off, the events table still logs")
        config = load(table_path(table))
        smap = config.smap
        if smap.hostname:
            self.hostname = smap.hostname
        if smap.logfile:
            try:
                self.log.open_file(smap.logfile)
            except OSError as exc:
                raise ConfigError(f"cannot open {smap.logfile}: {exc.strerror}") from None
        addr, port = jail.peer_address()
        if smap.tlscert:
            # As root, before the jail: the key need not be readable inside it.  No
            # tickets: this process's ticket key dies with this one connection.
            self.tls_ctx = server_context(smap, tickets=False)
        # Before the jail: this process and all it starts can no longer reach any other
        # process of its uid (smapd and its sendmails share it in the seed's table).
        sandbox.confine(hide=not smap.jail)
        # A database server is connected to now: the jail hides its socket and files.
        early = intake_open.before_jail(smap)
        pre_jail_init(smap.policy)
        try:
            jail.enter(smap.directory, smap.jail, smap.userid, smap.groupid)
        except BaseException:
            if early is not None:
                early.close()
            raise
        self.store = store = intake_open.in_jail(smap, early)
        site = Site(
            self.hostname,
            smap.maxbytes,
            smap.maxrecip,
            smap.maxerrors,
            smap.reserve,
            sink_or_none(self.log),
            store.free_space,
            smap.strictpipelining,
            tls=self.tls_ctx is not None,
            policy=smap.policy,
        )
        self.intake = Intake(site, addr, port)
        self.wait = float(smap.timeout) if smap.timeout > 0 else None
        self.deadline = time.monotonic() + smap.sessiontime
        if not smap.jail:
            note = f"jail off: not chrooted into {smap.directory} (smap: jail off)"
            _say("smap: " + note)
            self.log(LOG_WARNING, note)
            self.intake.note("jail", note)

    def refuse(self, text: str, priority: int, code: int) -> int:
        """Answer 421 instead of the banner, log why, and give the exit code."""
        self.log.failure(priority, text)
        _say("smap: " + text)
        self.write(R.R421_UNAVAILABLE % self.hostname.encode("ascii", "replace"))
        return code

    # --- the session ---
    def write(self, data: bytes, raw: bool = False) -> bool:
        """Send ``data``; False when the client is gone or stopped reading for ``wait``.

        After STARTTLS ``data`` is SMTP text and goes out in TLS records, unless
        ``raw`` (records OpenSSL made itself)."""
        if self.tls is not None and not raw:
            data = self.tls.encrypt(data)
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                # A client that sends but never reads would park us here for good.
                if not select.select([], [1], [], self.wait)[1]:
                    self.stalled = True
                    return False
                continue
            except OSError:
                return False
            view = view[n:]
        return True

    def serve(self) -> None:
        intake, wait = self.intake, self.wait
        assert intake is not None
        if wait is not None:
            os.set_blocking(1, False)  # so write() can time out (see there)
        ok = self.write(intake.greeting())
        carry = b""  # SMTP text that came in the same read as the handshake's end
        while ok and not intake.closed:
            data: bytes | None = carry
            carry = b""
            if not data:
                data = self.receive()
                if data is None:
                    break
            if not data:
                intake.eof()
                self.hang_up(linger=False)
                break
            out = intake.feed(data)
            while intake.pending is not None:
                out += intake.committed(self.commit(intake.pending))
            if out:
                ok = self.write(out)
            if ok and intake.tls_wait:
                carry = self.starttls()
            self.flush(intake.loose())
        if not intake.closed:
            intake.eof(
                "client stopped reading replies" if self.stalled else "peer dropped connection"
            )
        # Everything the client is owed has been said: let it go before the database
        # work that remains (audit events; the WAL checkpoint when we close last).
        self.hang_up(linger=True)
        self.flush(intake.loose(everything=True))
        assert self.store is not None
        self.store.close()

    def receive(self) -> bytes | None:
        """The next input (b"" at EOF), decrypted after STARTTLS; None when the
        session ended here (timeout, session time, a TLS error)."""
        intake, wait = self.intake, self.wait
        assert intake is not None
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.write(intake.expire())
                return None
            if not select.select([0], [], [], left if wait is None else min(wait, left))[0]:
                if wait is not None and wait <= left:
                    self.write(intake.timeout())
                    return None
                continue  # the session's time is up: said at the top of the loop
            try:
                data = os.read(0, READ_SIZE)
            except BlockingIOError:
                continue  # fd 0 shares fd 1's non-blocking mode; select said ready
            except OSError:
                data = b""
            if data and self.tls is not None:
                plain = self.decrypt(data)
                if plain is None or plain or self.tls.eof:
                    return plain
                continue  # a partial record, or a TLS message with no SMTP text
            return data

    def starttls(self) -> bytes:
        """The session said 220 to STARTTLS: the handshake, blocking, within ``wait``.

        Only bytes read here reach OpenSSL; the session already dropped whatever the
        client pipelined behind STARTTLS.  A failure ends the session (its event and
        log line are the core's).  Returns SMTP text the client sent over TLS in the
        same read as its last handshake message (a TLS 1.3 client may: GnuTLS does).
        """
        intake, ctx = self.intake, self.tls_ctx
        assert intake is not None and ctx is not None
        pipe = MemoryTls(ctx)
        data = b""
        while True:
            try:
                done, out = pipe.handshake(data)
            except TlsError as exc:
                self.write(exc.args[1])  # OpenSSL's alert, best effort
                intake.tls_failed(exc.args[0])
                return b""
            if out and not self.write(out):
                intake.tls_failed("client stopped reading")
                return b""
            if done:
                break
            if out:
                _quickack(0)
            left = self.deadline - time.monotonic()
            wait = left if self.wait is None else min(self.wait, left)
            if wait <= 0 or not select.select([0], [], [], wait)[0]:
                intake.tls_failed("timeout")
                return b""
            try:
                data = os.read(0, READ_SIZE)
            except BlockingIOError:
                data = b""
                continue
            except OSError:
                data = b""
            if not data:
                intake.tls_failed("client dropped connection")
                return b""
        self.tls = pipe
        intake.tls_started(pipe.version, pipe.cipher)
        return self.decrypt(b"") or b""

    def decrypt(self, data: bytes) -> bytes | None:
        """TLS records -> SMTP text; None when the TLS layer failed (session over)."""
        tls, intake = self.tls, self.intake
        assert tls is not None and intake is not None
        try:
            plain, reply = tls.decrypt(data)
        except TlsError as exc:
            intake.eof("TLS error: " + exc.args[0])
            return None
        if reply:  # records OpenSSL owes the client (a key update, an alert)
            self.write(reply, raw=True)
        return plain

    def commit(self, sub: Submission) -> StoreError | None:
        assert self.store is not None
        return self.store.accept([sub])[0]

    def flush(self, sub: Submission | None) -> None:
        """Write audit rows that belong to no message; a failure is only logged."""
        if sub is None:
            return
        error = self.commit(sub)
        if error is not None:
            self.log(
                LOG_ERR, f"fwtksyserr: {len(sub.events)} audit events not written: {error.reason}"
            )

    def hang_up(self, linger: bool) -> None:
        """Close gracefully: shut down writing, drain what the client still sends, close.

        A close with unread input makes the kernel send a reset, and a reset makes the
        client's kernel discard our last reply (the 421 or 221) if it is still unread.
        Without ``linger`` (the client closed first) there is nothing to wait for.
        """
        if self.closed_fds:
            return
        self.closed_fds = True
        if self.tls is not None and linger and not self.stalled:
            # Postfix's smtpd and serve end TLS with close_notify too; without it an
            # OpenSSL 3 client reports "unexpected eof" after our 221.
            self.write(self.tls.close_notify(), raw=True)
        import _socket  # noqa: PLC0415  (C module; only needed at the very end)

        try:
            sock = _socket.socket(fileno=1) if linger else None
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.shutdown(_socket.SHUT_WR)
                os.set_blocking(0, False)
                deadline = time.monotonic() + LINGER_SECONDS
                drained = 0
                while drained < LINGER_BYTES:
                    left = min(deadline - time.monotonic(), LINGER_QUIET)
                    if left <= 0 or not select.select([0], [], [], left)[0]:
                        break
                    data = os.read(0, READ_SIZE)
                    if not data:
                        break
                    drained += len(data)
            except OSError:
                pass
            finally:
                sock.detach()
        for fd in (0, 1):
            try:  # noqa: SIM105
                os.close(fd)
            except OSError:
                pass


def _quickack(fd: int) -> None:
    """ACK the client's next segment at once instead of 40 ms later.

    With no session tickets nothing follows our handshake flight, so the kernel would
    delay its ACK of the client's Finished, and a client with Nagle on (Postfix's smtp,
    smtplib) holds its EHLO until that ACK: 40 ms per TLS session on Linux.
    """
    import _socket  # noqa: PLC0415  (C module, already loaded with ssl)

    try:
        sock = _socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_QUICKACK, 1)
    except OSError:
        pass  # not TCP (a test's socketpair): there is no ACK to hurry
    finally:
        sock.detach()


def run(argv: list[str]) -> int:
    """The whole life of one receiver process; returns its exit code."""
    if argv[:1] == ["-daemon"]:
        from smapq.serve.main import run_daemon  # noqa: PLC0415  (the listener's imports)

        return run_daemon(argv[1:], prog="smap -daemon")
    _protect_stderr()
    try:
        table = _parse_args(argv)
    except ValueError as exc:
        if not str(exc):  # --help
            os.write(1, HELP.encode())
            return 0
        _say(f"smap: {exc}\n{USAGE}".strip())
        return EX_USAGE
    rx = InetdReceiver()
    try:
        rx.start(table)
    except ConfigError as exc:
        return rx.refuse(f"fwtkcfgerr: {exc}", LOG_ERR, EX_CONFIG)
    except (jail.JailError, sandbox.SandboxError) as exc:
        return rx.refuse(f"securityalert: {exc}", LOG_CRIT, exc.exit_code)
    except StoreError as exc:
        return rx.refuse(f"fwtksyserr: {exc.reason}", LOG_ERR, EX_TEMPFAIL)
    except Exception as exc:
        return rx.refuse(crash_report(exc), LOG_CRIT, EX_SOFTWARE)
    try:
        rx.serve()
    except Exception as exc:
        rx.log.failure(LOG_CRIT, crash_report(exc))
        rx.write(R.R421_UNAVAILABLE % rx.hostname.encode("ascii", "replace"))
        return EX_SOFTWARE
    return 0


def main() -> None:
    """Console-script entry point (``smap``).

    Exits with os._exit: every byte went out through os.write, the database and the
    connection are closed, so the interpreter's teardown would only cost time (about a
    millisecond per SMTP connection).
    """
    if sys.argv[1:2] == ["-daemon"]:
        sys.exit(run(sys.argv[1:]))  # a long-lived process: a normal interpreter exit
    os._exit(run(sys.argv[1:]))
