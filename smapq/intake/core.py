"""The intake core: one SMTP connection's decisions, without I/O.

Purpose: everything the receiver decides, made once for every transport -- the inetd
receiver (smapq.receive.main, blocking fd 0/1) and the listener (smapq.serve, an
event loop with many sessions).  An ``Intake`` wraps the sans-I/O SMTP session
(smapq.smtp.session) with:

- the audit trail (smapq.intake.audit): events rows and syslog lines;
- the Received: trace and the messages row of each accepted message;
- the storage decision: when the session holds a complete message, ``pending`` is a
  ``Submission`` (smapq.intake.port); the transport commits it through a backend and
  calls ``committed(error)``, which answers 250 only for a durable commit and 451/452
  otherwise, then goes on with whatever the client pipelined;
- refusals at the door (limits, and the access policy of the netperm-table at each
  RCPT: smapq.intake.policy) and the ends a transport imposes (idle timeout,
  session lifetime, shutdown), each a reply, an event and a log line.

A transport only moves bytes, keeps timers and hands submissions to a backend:

    out = intake.greeting()                    # or intake.refuse(reply, reason)
    out = intake.feed(data)                    # replies to send
    while intake.pending:                      # a message to commit
        out += intake.committed(store.accept([intake.pending])[0])
    rows = intake.loose()                      # audit rows to write on their own

Security: 250 is said only after the backend reported the commit durable; a failed
commit leaves nothing behind (the backend rolls back) and answers 4xx.  While a
commit is outstanding the core defers the end of the session (the client's EOF,
timeouts): the commit's outcome is always recorded, so an accepted message is never
forgotten by the audit trail and a refused one never half-stored.

STARTTLS: the session decides (smapq.smtp.session); when ``tls_wait`` is true the
transport runs the handshake over its own I/O and reports ``tls_started(version,
cipher)`` or ``tls_failed(detail)``.  A ``tls`` event records the outcome, the accept
row and the Received: trace of each message name the version and cipher.

Standards: RFC 5321 4.4 (the Received: trace, TCP-info as an address literal),
RFC 3848 / RFC 6531 3.7.3 ("with" types, ESMTPS/UTF8SMTPS), RFC 3207 (STARTTLS),
RFC 5321 4.2 (reply codes), Postfix's queue_minfree rule (452 4.3.1 at MAIL when the
spool is short of space).

Lean: stdlib only (HACKING.md); the inetd receiver imports it on every connection.
"""

from __future__ import annotations

import time

from smapq import __version__
from smapq.intake.audit import LOG_ERR, Audit
from smapq.intake.port import Submission
from smapq.smtp import replies as R
from smapq.smtp.session import Session
from smapq.store.ids import new_session_id

try:  # the builtin sha256 saves OpenSSL's ~2 ms start-up that hashlib pays
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.12 renamed it
    from hashlib import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from smapq.config.policy import Policy
    from smapq.intake.audit import LogSink
    from smapq.intake.port import StoreError
    from smapq.smtp.session import Envelope


class Site:
    """What every connection of one process shares: limits, names, the log sink."""

    __slots__ = (
        "free_space",
        "hostname",
        "log",
        "maxbytes",
        "maxerrors",
        "maxrecip",
        "policy",
        "reserve",
        "strict_sync",
        "tls",
    )

    def __init__(
        self,
        hostname: str,
        maxbytes: int,
        maxrecip: int,
        maxerrors: int,
        reserve: int = 0,
        log: LogSink | None = None,
        free_space: Callable[[], int | None] | None = None,
        strict_sync: bool = True,
        tls: bool = False,
        policy: Policy | None = None,
    ) -> None:
        self.hostname = hostname
        self.maxbytes = maxbytes
        self.maxrecip = maxrecip
        self.maxerrors = maxerrors
        self.reserve = reserve
        self.log = log
        self.free_space = free_space
        self.strict_sync = strict_sync
        self.tls = tls  # a certificate is loaded: EHLO offers STARTTLS
        # The access policy (smapq.config.policy), built once per process start or
        # reload; None: every recipient from every client, as FWTK smap took them.
        self.policy = policy


def received_header(
    env: Envelope, addr: str, hostname: str, queue_id: str, now: float, tls: str = ""
) -> str:
    """The smap-style Received: header (stored in messages.trace, not in the body).

    ``tls`` is "VERSION CIPHER" of a STARTTLS session: shown as Postfix shows it.
    """
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
    # RFC 5321 4.4: TCP-info is an address literal, "[IPv6:...]" for IPv6.
    literal = ("IPv6:" if ":" in addr else "") + (addr or "unknown")
    using = ""
    if tls:
        version, _, cipher = tls.partition(" ")
        using = f"\t(using {version} with cipher {cipher})\r\n"
    return (
        f"Received: from {env.helo or 'unknown'} (unknown [{literal}])\r\n{using}"
        f"\tby {hostname} via smap (smapq {__version__}) with {env.protocol}\r\n"
        f"\tid {queue_id}; {date}\r\n"
    )


def pre_jail_init(policy: Policy | None) -> None:
    """Load what connections will need before the transport chroots (Postfix's
    pre_jail_init): the jail holds no Python modules, and a table without a policy
    pays nothing for the policy's."""
    if policy is not None:
        import smapq.intake.policy  # noqa: F401, PLC0415


class Intake:
    """One SMTP connection's intake; see the module docstring for the contract."""

    __slots__ = (
        "_client",
        "_deferred_end",
        "_denied",
        "addr",
        "audit",
        "pending",
        "port",
        "session",
        "site",
    )

    def __init__(self, site: Site, addr: str, port: int) -> None:
        self.site = site
        self.addr = addr
        self.port = port
        self.audit = Audit(new_session_id(), addr, site.log)
        self.session = Session(
            site.hostname, site.maxbytes, site.maxrecip, site.maxerrors, site.strict_sync
        )
        self._denied = ""  # the deny rule's detail once one matched
        self._client: tuple[int, int] | None = None
        if site.free_space is not None or site.policy is not None:
            self.session.mail_check = self._mail_check
        if site.policy is not None:
            # Loaded by pre_jail_init: a table without a policy pays nothing for it.
            from smapq.intake.policy import client_of  # noqa: PLC0415

            self._client = client_of(addr)
            self.session.rcpt_check = self._rcpt_check
        self.session.tls_offered = site.tls
        self.pending: Submission | None = None
        self._deferred_end: tuple[str, bytes] | None = None

    @property
    def session_id(self) -> str:
        return self.audit.session_id

    @property
    def closed(self) -> bool:
        """True once the session said 221 or 421; the transport closes the connection."""
        return self.session.closed

    @property
    def in_data(self) -> bool:
        return self.session.in_data

    @property
    def tls_wait(self) -> bool:
        """True after 220 to STARTTLS: the transport runs the TLS handshake now."""
        return self.session.tls_wait and self.pending is None

    # --- the dialogue ---
    def greeting(self) -> bytes:
        out = self.session.greeting()
        self._drain()
        return out

    def refuse(self, reply: bytes, reason: str) -> bytes:
        """Turn the connection away instead of greeting it (a limit at the door)."""
        code = int(reply[:3])
        self.session.events.append(("connect", "", "", code))
        self.session.abort(reply, "reject", reason, code, reason)
        self._drain()
        # As Postfix does: the enhanced code goes out though no EHLO asked for it, so
        # the client's log says which limit (RFC 3463 4.7.0) turned it away.
        return reply

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        out = self.session.feed(data)
        self._drain()
        return out

    def committed(self, error: StoreError | None) -> bytes:
        """The outcome of ``pending``'s commit: 250, or the backend's 451/452."""
        sub = self.pending
        env = self.session.pending
        if sub is None or env is None:
            raise RuntimeError("no submission is waiting for its outcome")
        self.pending = None
        audit = self.audit
        written = len(sub.events) - 1  # the rows of audit.rows it carried (not "accept")
        if error is None:
            queue_id = str(sub.queue_id)
            del audit.rows[:written]
            audit.txn = []
            audit.stored(queue_id, env.sender, env.recipients, env.size)
            out = self.session.stored(queue_id)
        else:
            sub.untag()
            audit.say(
                LOG_ERR, f"fwtksyserr: cannot queue message from {audit.who}: {error.reason}"
            )
            out = self.session.store_failed(error.reply, error.reason)
        self._drain()
        if self._deferred_end is not None and self.pending is None:
            kind, reply = self._deferred_end
            self._deferred_end = None
            out += self._end(kind, reply)
        return out

    # --- STARTTLS: the transport's handshake outcome ---
    def tls_started(self, version: str, cipher: str) -> bytes:
        """The handshake is done; the session starts again (RFC 3207 4.2)."""
        out = self.session.tls_started(version, cipher)
        self._drain()
        return out

    def tls_failed(self, detail: str) -> None:
        """The handshake failed, or the client left in it: the session is over."""
        self.session.tls_failed(detail)
        self._drain()

    # --- ends imposed by the transport ---
    def timeout(self) -> bytes:
        """The idle timer fired: 421 4.4.2 and close."""
        return self._end("timeout", R.R421_TIMEOUT)

    def expire(self) -> bytes:
        """The session outlived ``sessiontime``: 421 4.4.2 and close."""
        return self._end("expire", R.R421_LIFETIME)

    def shutdown(self) -> bytes:
        """The server is stopping: 421 4.3.2 and close."""
        return self._end("shutdown", R.R421_SHUTDOWN)

    def eof(self, detail: str = "peer dropped connection") -> None:
        """The client went away, or the transport gives up on it."""
        if self.pending is not None:
            self._deferred_end = (detail, b"")
            return
        self.session.eof(detail)
        self._drain()

    def _end(self, kind: str, reply: bytes) -> bytes:
        if self.pending is not None:  # the commit's outcome comes first
            if self._deferred_end is None:
                self._deferred_end = (kind, reply)
            return b""
        if not reply:
            self.session.eof(kind)
            self._drain()
            return b""
        session = self.session
        if kind == "timeout":
            out = session.timeout()
        else:
            detail = "session time limit" if kind == "expire" else "server shutdown"
            out = session.abort(reply % session.hostname, kind, detail, int(reply[:3]), detail)
        self._drain()
        return out

    # --- audit rows for the transport to write ---
    def loose(self, everything: bool = False) -> Submission | None:
        """Audit rows to write without a message: all of them at the end
        (``everything``), else only when a long session has piled up many."""
        rows = self.audit.take_loose(everything)
        return Submission(None, (), rows) if rows else None

    def note(self, kind: str, detail: str) -> None:
        self.audit.note(kind, detail)

    # --- internals ---
    def _drain(self) -> None:
        session = self.session
        if session.events:
            self.audit.take(session.events)
        if session.pending is not None and self.pending is None:
            self.pending = self._submission(session.pending)

    def _submission(self, env: Envelope) -> Submission:
        now = time.time()
        audit = self.audit
        tls = self.session.tls
        # The accept row names the TLS version and cipher the message came over.
        accept = audit.row(now, "accept", tls, env.sender, 250)
        message: dict[str, object] = {
            "session_id": audit.session_id,
            "client_addr": self.addr or None,
            "client_port": self.port or None,
            "client_name": None,
            "state": "received",
            "received_at": now,
            "helo": env.helo or None,
            "protocol": env.protocol,
            "mail_from": env.sender,
            "size": env.size,
            "body": env.body,
            "body_sha256": sha256(env.body).hexdigest(),
            "next_attempt_at": now,
            "updated_at": now,
        }
        hostname = self.site.hostname

        def trace(queue_id: str) -> str:
            return received_header(env, self.addr, hostname, queue_id, now, tls)

        sub = Submission(
            message, env.recipients, [*audit.rows, accept], [*audit.txn, accept], trace
        )
        sub.renew_id()
        return sub

    def _rcpt_check(self, sender: str, rcpt: str) -> tuple[bytes, str, bool]:
        """The access policy's decision on one recipient (smapq.intake.policy)."""
        from smapq.intake.policy import decide  # noqa: PLC0415 - loaded by __init__

        policy = self.site.policy
        assert policy is not None
        reply, detail, deny = decide(policy, self._client, sender, rcpt)
        if deny:
            self._denied = detail
        return reply, detail, deny

    def _mail_check(self) -> tuple[bytes, str] | None:
        if self._denied:  # a deny rule matched: this session sends nothing more
            return R.R554_DENIED_SESSION, self._denied + ": session denied"
        site = self.site
        if site.free_space is None:
            return None
        free = site.free_space()
        if free is None or free >= site.reserve:
            return None
        return R.R452_NO_SPACE, f"spool has {free} bytes free, below minfree {site.reserve}"
