"""``smap`` (= ``smapq receive``): the inetd-spawned SMTP receiver.

Purpose: inetd, xinetd or systemd (``Accept=yes``) starts one ``smap`` per SMTP
connection with the socket on fd 0 and 1.  It speaks SMTP through the sans-I/O
``smapq.smtp.session.Session`` and queues each message in the database in one
transaction before it answers 250.  Usage: ``smap [-t netperm-table]``.

Start order (Postfix's pre-jail / post-jail seam), all before the banner:
  pre-jail, as root: keep stderr off the wire; open syslog (mail facility,
  LOG_NDELAY so the /dev/log socket survives the chroot; a missing /dev/log only
  disables syslog); read the netperm-table (refused when others may write it) and
  resolve the smap uid/gid; every module the session needs is imported at the top of
  this file, because nothing outside the jail can be imported later; read the peer
  from getpeername(0) or $REMOTE_ADDR/$REMOTE_PORT.
  jail (smapq.receive.jail): chroot(directory) -> chdir / -> setgroups([]) ->
  setgid -> setuid, then setuid(0) must fail.  ``smap: jail off`` skips the chroot
  and the receiver says so (stderr when stderr is not the connection, and syslog).
  post-jail, as the smap uid: open the database by its path inside the jail
  (smapq.receive.queue); then the 220 banner.

Security: the client never sees a traceback.  When stderr is the connection (inetd
dups the socket onto fd 0, 1 and 2; so does systemd's default StandardError=inherit)
it is pointed at /dev/null first.  Any failure before the banner answers ``421`` and
exits; an internal error after it answers ``421`` too and is logged to syslog with
its stack.  Address and body checks are the session's.

Diagnostics: syslog ident ``smap``, facility mail, one line per recipient like FWTK
smap (``host=NAME/IP bytes=N from=<S> to=<R> id=QUEUEID``), ``connect``/``exiting``
lines, and ``fwtkcfgerr:`` / ``fwtksyserr:`` / ``securityalert:`` prefixes.  The same
facts go to the ``events`` table (kinds connect, helo, mail, rcpt, reject, accept,
vrfy, expn, timeout, disconnect, jail) under one session id; the events of a stored
message are committed with it.  The client name is "unknown": no DNS lookups are done
(the jail has no resolver, and FWTK's lookup cost a round trip per connection).

Exit codes: 0 after a session; 64 usage; 75 database unavailable; 77 jail failure;
78 configuration error; 70 internal error.

Lean: stdlib only, no re/enum/typing/logging/SQLAlchemy (HACKING.md); checked by
tests/test_layout.py.
"""

from __future__ import annotations

import os
import select
import sys
import syslog
import time

from smapq import __version__
from smapq.config.netperm import table_path
from smapq.config.settings import load
from smapq.errors import EX_CONFIG, EX_SOFTWARE, EX_TEMPFAIL, EX_USAGE, ConfigError
from smapq.receive import jail
from smapq.receive.queue import Queue, StoreError
from smapq.smtp import replies as R
from smapq.smtp.session import Session
from smapq.store.ids import new_session_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from smapq.config.settings import SmapSettings
    from smapq.receive.queue import EventRow
    from smapq.smtp.session import Envelope

USAGE = "usage: smap [-t netperm-table]\n"
HELP = (
    USAGE + "\nThe SMTP receiver, started by inetd per connection with the socket on fd 0/1.\n"
    "-t PATH  the netperm-table (default: $SMAPQ_TABLE, else "
    "/usr/local/etc/netperm-table)\n"
)
READ_SIZE = 65536
# Audit rows kept in memory before the ones that belong to no open transaction are
# written on their own (the session bounds them too; this bounds the process).
FLUSH_ROWS = 1000


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


class Receiver:
    """One SMTP connection from start-up to exit."""

    __slots__ = (
        "addr",
        "hostname",
        "message_cols",
        "messages",
        "port",
        "queue",
        "rows",
        "session",
        "session_id",
        "settings",
        "stalled",
        "syslog_on",
        "txn",
        "volume",
        "wait",
    )

    def __init__(self) -> None:
        self.hostname = os.uname().nodename
        self.syslog_on = False
        self.addr = ""
        self.port = 0
        self.session_id = ""
        self.queue: Queue | None = None
        self.session: Session | None = None
        self.settings: SmapSettings | None = None
        self.rows: list[EventRow] = []  # events not yet written, in order
        # The open transaction's own rows (its mail, rcpt and reject rows; also in
        # self.rows): they get the queue id when its message is stored.
        self.txn: list[EventRow] = []
        self.message_cols: dict[str, object] = {}
        self.messages = 0
        self.volume = 0
        self.wait: float | None = None  # smap: timeout, None for none (FWTK's 0)
        self.stalled = False

    # --- logging ---
    def log(self, text: str, priority: int = syslog.LOG_INFO) -> None:
        if self.syslog_on:
            syslog.syslog(priority, text[:1000])

    @property
    def who(self) -> str:
        return f"unknown/{self.addr or 'unknown'}"

    def _row(self, at: float, kind: str, detail: str, addr: str | None, code: int) -> EventRow:
        return {
            "at": at,
            "kind": kind,
            "session_id": self.session_id,
            "queue_id": None,
            "client_addr": self.addr or None,
            "address": addr,
            "code": code or None,
            "detail": detail or None,
        }

    def drain(self) -> None:
        """Turn the session's new events into rows and syslog lines."""
        assert self.session is not None
        events = self.session.events
        if not events:
            return
        now = time.time()
        for kind, detail, addr, code in events:
            if kind == "accept":
                continue  # written by store() with the message itself
            # The session says "<>" for the null sender, stored as messages.mail_from
            # stores it (""), so reports can match refusals to senders.
            row = self._row(now, kind, detail, _stored_address(addr), code)
            self.rows.append(row)
            if kind == "mail":
                self.txn = [row]
            elif kind in ("rcpt", "reject") and self.txn:
                self.txn.append(row)
            self._syslog_event(kind, detail, addr, code)
        events.clear()
        if len(self.rows) > FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Write the rows before the open transaction (they will get no queue id)."""
        assert self.queue is not None
        cut = len(self.rows)
        if self.txn:
            first = self.txn[0]
            cut = next(i for i, row in enumerate(self.rows) if row is first)
        if not cut:
            return
        rows = self.rows[:cut]
        del self.rows[:cut]
        try:
            self.queue.log(rows)
        except StoreError as exc:
            self.log(
                f"fwtksyserr: {len(rows)} audit events not written: {exc.reason}", syslog.LOG_ERR
            )

    def _syslog_event(self, kind: str, detail: str, addr: str, code: int) -> None:
        if not self.syslog_on or kind in ("helo", "mail", "rcpt"):
            return
        if kind == "connect":
            self.log(f"connect host={self.who}")
        elif kind == "reject":
            alert = "securityalert: " if "'-'" in detail else ""
            self.log(
                f"{alert}reject host={self.who} code={code} reason={detail} address={addr}",
                syslog.LOG_NOTICE,
            )
        elif kind in ("vrfy", "expn"):
            self.log(f"{kind.upper()} {detail} ({self.who})", syslog.LOG_NOTICE)
        elif kind == "timeout":
            self.log(f"timeout - exiting host={self.who} {detail}".rstrip(), syslog.LOG_NOTICE)
        elif kind == "disconnect":
            what = "exiting" if self.messages else "exiting with no message"
            self.log(
                f"{what} host={self.who} messages={self.messages} bytes={self.volume} "
                f"reason={detail}"
            )

    # --- start-up ---
    def start(self, table: str | None) -> None:
        """Pre-jail init, the jail, post-jail init; raises on any refusal."""
        if os.path.exists("/dev/log"):
            syslog.openlog("smap", syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_MAIL)
            self.syslog_on = True
        else:
            _say("smap: /dev/log is missing: syslog is off, the events table still logs")
        config = load(table_path(table))
        smap = self.settings = config.smap
        if smap.hostname:
            self.hostname = smap.hostname
        self.addr, self.port = jail.peer_address()
        self.session_id = new_session_id()
        if smap.database_is_url:
            raise StoreError(
                f"smap queues only into an SQLite file, not {smap.database.split(':')[0]}: URLs"
                " (set 'smap: database' to a file name)",
                R.R421_UNAVAILABLE,
            )
        jail.enter(smap.directory, smap.jail, smap.userid, smap.groupid)
        self.queue = Queue(smap.database_in_jail)
        self.session = Session(self.hostname, smap.maxbytes, smap.maxrecip, smap.maxerrors)
        self.message_cols = {
            "session_id": self.session_id,
            "client_addr": self.addr or None,
            "client_port": self.port or None,
            "client_name": None,
        }
        if not smap.jail:
            note = f"jail off: not chrooted into {smap.directory} (smap: jail off)"
            _say("smap: " + note)
            self.log(note, syslog.LOG_WARNING)
            self.rows.append(self._row(time.time(), "jail", note, None, 0))

    def refuse(self, text: str, priority: int, code: int) -> int:
        """Answer 421 instead of the banner, log why, and give the exit code."""
        self.log(text, priority)
        _say("smap: " + text)
        self.write(R.R421_UNAVAILABLE % self.hostname.encode("ascii", "replace"))
        return code

    # --- the session ---
    def write(self, data: bytes) -> bool:
        """Send ``data``; False when the client is gone or stopped reading for ``wait``."""
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
        session, settings = self.session, self.settings
        assert session is not None and settings is not None
        wait = self.wait = float(settings.timeout) if settings.timeout > 0 else None
        if wait is not None:
            os.set_blocking(1, False)  # so write() can time out (see there)
        ok = self.write(session.greeting())
        self.drain()
        while ok and not session.closed:
            if wait is not None and not select.select([0], [], [], wait)[0]:
                self.write(session.timeout())
                break
            try:
                data = os.read(0, READ_SIZE)
            except BlockingIOError:
                continue  # fd 0 shares fd 1's non-blocking mode; select said ready
            except OSError:
                data = b""
            if not data:
                session.eof()
                break
            out = session.feed(data)
            while session.pending is not None:
                out += self.store(session.pending)
            if out:
                ok = self.write(out)
            self.drain()
        if not session.closed:
            if self.stalled:
                session.eof("client stopped reading replies")
            else:
                session.eof()
        self.drain()
        # Everything the client is owed has been said: let it go before the database
        # work that remains (audit events; the WAL checkpoint when we close last).
        for fd in (0, 1):
            try:  # noqa: SIM105
                os.close(fd)
            except OSError:
                pass
        self.finish()

    def store(self, env: Envelope) -> bytes:
        """Commit the pending message; the session's reply (250 only after COMMIT)."""
        session, queue = self.session, self.queue
        assert session is not None and queue is not None
        self.drain()
        now = time.time()
        accept = self._row(now, "accept", "", env.sender, 250)
        try:
            qid = queue.accept(
                env,
                self.message_cols,
                [*self.rows, accept],
                [*self.txn, accept],
                lambda q: self.trace(env, q, now),
                now,
            )
        except StoreError as exc:
            self.log(
                f"fwtksyserr: cannot queue message from {self.who}: {exc.reason}", syslog.LOG_ERR
            )
            return session.store_failed(exc.reply, exc.reason)
        self.rows = []
        self.txn = []
        self.messages += 1
        self.volume += env.size
        for rcpt in env.recipients:
            self.log(f"host={self.who} bytes={env.size} from=<{env.sender}> to=<{rcpt}> id={qid}")
        return session.stored(qid)

    def trace(self, env: Envelope, queue_id: str, now: float) -> str:
        """The smap-style Received: header (stored in messages.trace, not in the body)."""
        date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
        # RFC 5321 4.4: TCP-info is an address literal, "[IPv6:...]" for IPv6.
        literal = ("IPv6:" if ":" in self.addr else "") + (self.addr or "unknown")
        return (
            f"Received: from {env.helo or 'unknown'} (unknown [{literal}])\r\n"
            f"\tby {self.hostname} via smap (smapq {__version__}) with {env.protocol}\r\n"
            f"\tid {queue_id}; {date}\r\n"
        )

    def finish(self) -> None:
        """Write the events no stored message carried; close the database."""
        rows = self.rows
        self.rows, self.txn = [], []
        if self.queue is None:
            return
        try:
            self.queue.log(rows)
        except StoreError as exc:
            self.log(
                f"fwtksyserr: {len(rows)} audit events not written: {exc.reason}", syslog.LOG_ERR
            )
        self.queue.close()


def _stored_address(addr: str) -> str | None:
    """events.address for a session event's address: "<>" -> "", "" -> NULL."""
    if addr == "<>":
        return ""
    return addr or None


def _crash_report(exc: BaseException) -> str:
    """The stack as one line, without importing traceback (the jail hides its source)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}:{code.co_name}")
        tb = tb.tb_next
    where = " < ".join(reversed(frames))
    return f"fwtksyserr: internal error {type(exc).__name__}: {exc} at {where}"


def run(argv: list[str]) -> int:
    """The whole life of one receiver process; returns its exit code."""
    _protect_stderr()
    try:
        table = _parse_args(argv)
    except ValueError as exc:
        if not str(exc):  # --help
            os.write(1, HELP.encode())
            return 0
        _say(f"smap: {exc}\n{USAGE}".strip())
        return EX_USAGE
    rx = Receiver()
    try:
        rx.start(table)
    except ConfigError as exc:
        return rx.refuse(f"fwtkcfgerr: {exc}", syslog.LOG_ERR, EX_CONFIG)
    except jail.JailError as exc:
        return rx.refuse(f"securityalert: {exc}", syslog.LOG_CRIT, exc.exit_code)
    except StoreError as exc:
        return rx.refuse(f"fwtksyserr: {exc.reason}", syslog.LOG_ERR, EX_TEMPFAIL)
    except Exception as exc:
        return rx.refuse(_crash_report(exc), syslog.LOG_CRIT, EX_SOFTWARE)
    try:
        rx.serve()
    except Exception as exc:
        rx.log(_crash_report(exc), syslog.LOG_CRIT)
        rx.write(R.R421_UNAVAILABLE % rx.hostname.encode("ascii", "replace"))
        return EX_SOFTWARE
    return 0


def main() -> None:
    """Console-script entry point (``smap``).

    Exits with os._exit: every byte went out through os.write, the database and the
    connection are closed, so the interpreter's teardown would only cost time (about a
    millisecond per SMTP connection).
    """
    code = run(sys.argv[1:])
    os._exit(code)
