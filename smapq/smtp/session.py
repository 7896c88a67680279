"""The SMTP server state machine, without I/O.

Purpose: one flat ``Session`` per connection.  The driver (the inetd receiver, later
a listener) calls ``greeting()``, then ``feed(bytes)`` with whatever arrived and
writes the returned reply bytes.  Verbs dispatch by method name (``smtp_MAIL``).
There is one receive buffer per session and no coroutine per command.

Storage is not done here.  When ``<CRLF>.<CRLF>`` ends a message the session sets
``pending`` to an ``Envelope`` and stops reading its buffer; the driver stores the
envelope and calls ``stored(queue_id)`` (-> 250) or ``store_failed(reply, reason)``
(-> 451/452), which return the reply plus the replies to any commands the client
pipelined behind the dot.  So 250 is only ever said after the driver's COMMIT, and
an error later in the session cannot touch an accepted message: the session holds
no reference to it any more.

The session appends audit events to ``events`` as tuples (kind, detail, address,
code): kinds are connect, helo (detail = verb and name), mail, rcpt (detail = the
driver's access decision, if it made one), reject (detail = reason), accept (detail =
queue id), vrfy, expn, timeout, disconnect, tls (detail = "VERSION CIPHER" with code
220 after a handshake, "handshake failed: ..." with 0).  ``address`` is
the mailbox the event is about, as it would be stored (brackets and source route
removed): the sender for mail/accept and for refusals of MAIL, its parameters or the
message data; the recipient for rcpt and refusals of RCPT; ``"<>"`` for the null
sender (the driver stores it as ``""``, as messages.mail_from has it); ``""`` when
the event concerns no mailbox (a HELO/EHLO name is in the detail).  A refused path
that cannot be parsed is logged as the text between its brackets.  So ``smapq
report`` can count refusals per sender and recipient.  Client text in events is cut
to LOG_TEXT_MAX octets and control characters are shown as ``?``.  The driver drains
the list (``events.clear()`` after reading).

DATA: end of data is ONLY ``<CRLF>.<CRLF>`` (RFC 5321 4.1.1.4).  Bare-newline
policy (SMTP smuggling, CVE-2023-51764/5/6): a bare LF or bare CR never ends the
message; a message containing either is refused with R550_BARE_NEWLINE after the
real end of data, like Postfix ``smtpd_forbid_bare_newline = reject``.  RFC 5321
2.3.8 forbids them in SMTP data (8BITMIME included; BINARYMIME is not offered).
Dot-unstuffing is byte-exact: the first character of a line that starts with
``.`` is removed (RFC 5321 4.5.2), nothing else changes; the body is stored as
received, CRLF line ends included.  Every DATA refusal (size, line length, bare
newline) is sent only after the final dot, so the rest of a refused body is never
read as commands.  ``maxbytes`` counts the unstuffed body octets, CRLFs included.

Limits: command lines over 512 octets and text lines over 1000 octets get 500
5.5.2; the session reads to the end of the line (or of the data) first, keeping
at most a few octets of an overlong command and at most about 4/3 * maxbytes of a
body.  ``maxbytes`` < 0 and ``maxrecip`` < 0 mean unlimited (smap's defaults).
Every command either counts toward a limit or ends a transaction that counts
(HELO/EHLO and RSET are junk commands, RCPTs past maxrecip count once past the
overshoot allowance), so a session that stores no mail makes a bounded number of
events and then gets 421: a flood of ``HELO x`` cannot grow the driver's memory or
the audit log without end.  The junk and overshoot counts restart after each
accepted message, as Postfix does, so many messages per connection are fine.

Security: the session trusts nothing it is fed; it never raises on input (a
hypothesis test feeds it arbitrary bytes).  Addresses are checked by
smapq.smtp.address.

STARTTLS (RFC 3207): offered by EHLO only when the driver set ``tls_offered`` and
TLS is not on yet.  After ``220 Ready to start TLS`` the session reads nothing
(``tls_wait``) and drops whatever the client pipelined behind STARTTLS: it came in
plaintext (CVE-2011-0411).  ``tls_started`` resets to the state after the greeting
(RFC 3207 4.2); a second STARTTLS gets 554 5.5.1.  The "with" type gains an ``S``
(ESMTPS, UTF8SMTPS; RFC 3848, RFC 6531), HELO sessions stay SMTP (as Postfix).

Standards: RFC 5321, RFC 1869/5321 EHLO, RFC 1870 SIZE, RFC 6152 8BITMIME,
RFC 2920 PIPELINING, RFC 2034 ENHANCEDSTATUSCODES, RFC 6531 SMTPUTF8; the envelope's
protocol (the Received: "with" type) is SMTP, ESMTP (RFC 3848) or UTF8SMTP (RFC 6531
3.7.3, when MAIL carried SMTPUTF8).

Lean: stdlib only, no re/dataclasses/enum/typing at run time (HACKING.md).
"""

from __future__ import annotations

from smapq.smtp import address, limits
from smapq.smtp import replies as R

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Event = tuple[str, str, str, int]

# Session states.
_CMD = 0  # reading command lines
_SKIP = 1  # discarding the rest of an overlong command line
_DATA = 2  # reading message data, keeping it
_DISCARD = 3  # reading message data to the final dot, refusal already decided
_PENDING = 4  # a message waits for the driver's storage outcome
_TLS_WAIT = 5  # 220 to STARTTLS said; the driver runs the TLS handshake
_CLOSED = 6

_DOT_END = b"\r\n.\r\n"
# RFC 2920 3.1: commands that may only be the last of a pipelined group.
_LAST_IN_GROUP = frozenset(("HELO", "EHLO", "DATA", "NOOP", "VRFY", "EXPN"))
_DATA_REASONS = {
    R.R552_TOO_BIG: "message over maxbytes",
    R.R550_BARE_NEWLINE: "bare CR or LF in message data",
    R.R550_NUL: "NUL character in message data",
    R.R500_DATA_LINE_TOO_LONG: "message line too long",
}
_SHOW = bytes(b if 0x20 <= b != 0x7F else 0x3F for b in range(256))


def show(data: bytes) -> str:
    """Client text made safe for logs: cut, controls as ``?``, bad UTF-8 escaped."""
    return data[: limits.LOG_TEXT_MAX].translate(_SHOW).decode("utf-8", "backslashreplace")


def _logged_address(path: bytes) -> str:
    """A parsed path as events show it: ``<>`` for the null path, else ``show``."""
    return show(path) if path else "<>"


def _path_text(rest: bytes) -> str:
    """Best-effort address text of a path that did not parse (for the audit log)."""
    rest = rest.strip(b" ")
    if rest[:1] == b"<":
        end = rest.rfind(b">")
        rest = rest[1:end] if end > 0 else rest[1:]
    return show(rest)


class Envelope:
    """A complete message the driver must store before the client hears 250."""

    __slots__ = ("body", "helo", "params", "protocol", "recipients", "sender", "size")

    def __init__(
        self,
        sender: str,
        recipients: list[str],
        body: bytes,
        helo: str,
        protocol: str,
        params: dict[str, str],
    ) -> None:
        self.sender = sender  # "" for the null reverse-path <>
        self.recipients = recipients
        self.body = body  # unstuffed, CRLF line ends, byte-exact
        self.helo = helo  # "" when the client never said HELO/EHLO
        self.protocol = protocol  # the Received: "with" type: SMTP, ESMTP or UTF8SMTP
        self.params = params  # MAIL parameters, e.g. {"BODY": "8BITMIME"}
        self.size = len(body)


class Session:
    """One SMTP server session; see the module docstring for the contract."""

    __slots__ = (
        "_buf",
        "_data_reply",
        "_errors",
        "_esmtp",
        "_helo",
        "_junk_count",
        "_line_start",
        "_out",
        "_overshoot",
        "_params",
        "_pos",
        "_rcpts",
        "_scan",
        "_sender",
        "_state",
        "error_limit",
        "events",
        "hostname",
        "mail_check",
        "max_bytes",
        "max_recipients",
        "pending",
        "rcpt_check",
        "strict_sync",
        "tls",
        "tls_offered",
    )

    def __init__(
        self,
        hostname: str,
        max_bytes: int = -1,
        max_recipients: int = -1,
        error_limit: int = limits.ERROR_LIMIT,
        strict_sync: bool = False,
    ) -> None:
        self.hostname = hostname.encode("ascii", "replace")
        self.max_bytes = max_bytes
        self.max_recipients = max_recipients
        self.error_limit = error_limit
        # Refuse commands sent ahead of our reply where PIPELINING does not allow it
        # (Postfix's smtpd_forbid_unauth_pipelining): see _out_of_sync.
        self.strict_sync = strict_sync
        self.events: list[Event] = []
        self.pending: Envelope | None = None
        # The driver's check before a sender is accepted (free spool space, a session
        # the access policy denied): a refusal (reply, reason) or None.
        self.mail_check: Callable[[], tuple[bytes, str] | None] | None = None
        # The driver's access decision on each recipient, given (sender, recipient):
        # (reply, detail, deny); reply b"" accepts it, ``detail`` goes into the event;
        # a refusal counts as an error (dictionary attacks end at maxerrors) and
        # ``deny`` also drops the transaction.
        self.rcpt_check: Callable[[str, str], tuple[bytes, str, bool]] | None = None
        self._buf = bytearray()
        self._pos = 0
        self._state = _CMD
        self._scan = 0
        self._line_start = 0
        self._data_reply = b""
        self._errors = 0
        self._junk_count = 0
        self._overshoot = 0
        self._esmtp = False
        self._helo = ""
        self._sender: str | None = None
        self._rcpts: list[str] = []
        self._params: dict[str, str] = {}
        self._out: list[bytes] = []
        # STARTTLS (RFC 3207): the driver sets ``tls_offered`` when it has a
        # certificate; ``tls`` is "VERSION CIPHER" once the handshake is done.
        self.tls_offered = False
        self.tls = ""

    # --- driver interface ---
    @property
    def closed(self) -> bool:
        """True once the session said 221 or 421; the driver closes the connection."""
        return self._state == _CLOSED

    @property
    def tls_wait(self) -> bool:
        """True after 220 to STARTTLS: the driver runs the handshake, then calls
        ``tls_started`` or ``tls_failed``; nothing is read as a command meanwhile."""
        return self._state == _TLS_WAIT

    @property
    def in_data(self) -> bool:
        """True while message data is being read (drivers may use a longer timeout)."""
        return self._state in (_DATA, _DISCARD)

    def greeting(self) -> bytes:
        """The 220 banner; call once, before the first ``feed``."""
        self.events.append(("connect", "", "", 220))
        return R.R220_BANNER % self.hostname

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take received bytes, return the replies to send (possibly b"")."""
        if self._state >= _PENDING:
            if self._state == _PENDING:
                self._buf += data
            return b""
        self._buf += data
        return self._run()

    def stored(self, queue_id: str) -> bytes:
        """The pending message is committed: reply 250 and go on with the input."""
        env = self._take_pending()
        self.events.append(("accept", queue_id, env.sender or "<>", 250))
        self._junk_count = self._overshoot = 0  # Postfix: reset after mail is delivered
        self._out = [self._r(R.R250_ACCEPTED % queue_id.encode("ascii", "replace"))]
        return self._run(keep_out=True)

    def store_failed(self, reply: bytes, reason: str) -> bytes:
        """The pending message could not be stored: send ``reply`` (4xx) instead."""
        env = self._take_pending()
        self.events.append(("reject", reason, env.sender or "<>", int(reply[:3])))
        self._out = [self._r(reply)]
        return self._run(keep_out=True)

    def timeout(self) -> bytes:
        """The driver's idle timer fired: 421 4.4.2 and close."""
        if self._state == _CLOSED:
            return b""
        self.events.append(("timeout", "in DATA" if self.in_data else "", "", 421))
        self._close("timeout")
        return self._r(R.R421_TIMEOUT % self.hostname)

    def abort(self, reply: bytes, kind: str, detail: str, code: int, reason: str) -> bytes:
        """The driver ends the session (a limit, shutdown): event ``kind``, ``reply``."""
        if self._state == _CLOSED:
            return b""
        self.events.append((kind, detail, "", code))
        self._close(reason)
        return self._r(reply)

    def tls_started(self, version: str, cipher: str) -> bytes:
        """The handshake succeeded: back to the state just after the greeting.

        RFC 3207 4.2: everything learned before TLS is forgotten (HELO/EHLO name,
        ESMTP, the transaction); the client must say EHLO again.  Nothing was kept of
        what it sent after STARTTLS in plaintext (see smtp_STARTTLS).
        """
        if self._state != _TLS_WAIT:
            raise RuntimeError("no STARTTLS is waiting for its handshake")
        self.tls = f"{version} {cipher}"
        self.events.append(("tls", self.tls, "", 220))
        self._state = _CMD
        self._esmtp = False
        self._helo = ""
        self._reset()
        self._buf.clear()
        self._pos = 0
        return b""

    def tls_failed(self, detail: str) -> None:
        """The handshake failed or the client left during it: the session ends."""
        if self._state != _CLOSED:
            self.events.append(("tls", "handshake failed: " + detail[:200], "", 0))
            self._close("TLS handshake failed")

    def eof(self, detail: str = "peer dropped connection") -> None:
        """The client went away, or the driver gives up on it (``detail`` says why)."""
        if self._state != _CLOSED:
            if self.in_data:
                detail += " in DATA"
            self._close(detail)

    # --- the input loop ---
    def _run(self, keep_out: bool = False) -> bytes:
        if not keep_out:
            self._out = []
        buf = self._buf
        while True:
            state = self._state
            if state == _CMD:
                start = self._pos
                nl = buf.find(b"\n", start)
                if nl < 0:
                    if len(buf) - start >= limits.COMMAND_LINE_MAX:
                        self._state = _SKIP
                        self._pos = len(buf)
                    break
                self._pos = nl + 1
                if nl + 1 - start > limits.COMMAND_LINE_MAX:
                    self._error(R.R500_COMMAND_TOO_LONG, "command line too long")
                    continue
                end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
                self._command(bytes(buf[start:end]), nl + 1 < len(buf))
            elif state == _SKIP:
                nl = buf.find(b"\n", self._pos)
                if nl < 0:
                    self._pos = len(buf)
                    break
                self._pos = nl + 1
                self._state = _CMD
                self._error(R.R500_COMMAND_TOO_LONG, "command line too long")
            elif state in (_DATA, _DISCARD):
                if not self._data():
                    break
            else:
                break
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        out = self._out
        return out[0] if len(out) == 1 else b"".join(out)

    def _command(self, line: bytes, more: bool) -> None:
        """Run one command line; ``more``: the client sent input after it already."""
        sp = line.find(b" ")
        verb, arg = (line, b"") if sp < 0 else (line[:sp], line[sp + 1 :])
        handler: Callable[[bytes], None] | None = None
        name = verb.decode("ascii", "replace").upper()
        if more and self.strict_sync and (not self._esmtp or name in _LAST_IN_GROUP):
            self._out_of_sync(name)
            return
        if verb.isalpha():
            handler = getattr(self, "smtp_" + name, None)
        if handler is None:
            self._error(R.R500_UNRECOGNIZED, "command unrecognized: " + show(line[:40]))
        else:
            handler(arg)

    def _out_of_sync(self, after: str) -> None:
        """Input arrived before our reply where PIPELINING does not allow it.

        RFC 2920 3.1: EHLO, DATA, VRFY, EXPN and NOOP end a pipelined group, and
        without EHLO's PIPELINING there is no group at all; a client that sends ahead
        anyway is a spam engine or a smuggling probe (Postfix's
        smtpd_forbid_unauth_pipelining, on by default since 3.9).  554 and close,
        nothing of what it sent ahead is executed.
        """
        what = show(after.encode()[:20]) or "the greeting"
        self.events.append(("reject", f"improper command pipelining after {what}", "", 554))
        self._reply(R.R554_SYNC)
        self._close("protocol synchronization")

    # --- replies, errors, events ---
    def _r(self, reply: bytes) -> bytes:
        """RFC 2034: enhanced status codes only after they were advertised by EHLO."""
        return reply if self._esmtp else R.plain(reply)

    def _reply(self, reply: bytes) -> None:
        self._out.append(self._r(reply))

    def _reject(self, reply: bytes, reason: str, addr: str = "") -> None:
        """A refusal that is not the client's fault (no error count)."""
        self.events.append(("reject", reason, addr, int(reply[:3])))
        self._reply(reply)

    def _error(self, reply: bytes, reason: str, addr: str = "") -> None:
        """A refusal caused by the client; too many of them end the session."""
        self._reject(reply, reason, addr)
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.error_limit and self._state != _CLOSED:
            self.events.append(("reject", "too many errors", "", 421))
            self._reply(R.R421_TOO_MANY_ERRORS % self.hostname)
            self._close("too many errors")

    def _junk(self, reply: bytes) -> None:
        """Reply to NOOP/RSET/VRFY/EXPN/HELP; past JUNK_COMMAND_LIMIT each is an error."""
        self._reply(reply)
        self._count_junk()

    def _count_junk(self) -> None:
        self._junk_count += 1
        if self._junk_count > limits.JUNK_COMMAND_LIMIT:
            self._count_error()

    def _close(self, detail: str) -> None:
        self._state = _CLOSED
        self.events.append(("disconnect", detail, "", 0))
        self._buf.clear()
        self._pos = 0

    def _reset(self) -> None:
        self._sender = None
        self._rcpts = []
        self._params = {}

    def _take_pending(self) -> Envelope:
        env = self.pending
        if env is None or self._state != _PENDING:
            raise RuntimeError("no message is waiting for a storage outcome")
        self.pending = None
        self._state = _CMD
        self._reset()
        return env

    # --- HELO / EHLO ---
    def _hello(self, arg: bytes, verb: str, syntax: bytes) -> bool:
        arg = arg.strip(b" ")
        # A domain or address literal is at most 255 octets (RFC 5321 4.5.3.1.2); a
        # longer one would also push the echoing 250 past the 512-octet reply line.
        bad = len(arg) > limits.DOMAIN_MAX or address.has_control(arg) or not arg.isascii()
        if not arg or bad:
            # The name goes in the detail: events' address is for mailboxes only (the
            # reports count refusals per sender and recipient by it).
            self._error(syntax, f"{verb} syntax: {show(arg)}" if arg else verb + " syntax")
            return False
        self._reset()
        self._helo = arg.decode("ascii")
        self.events.append(("helo", f"{verb} {self._helo}", "", 250))
        return True

    def smtp_HELO(self, arg: bytes) -> None:
        if self._hello(arg, "HELO", R.R501_HELO_SYNTAX):
            self._esmtp = False
            self._out.append(R.R250_HELO % arg.strip(b" "))
            self._count_junk()

    def smtp_EHLO(self, arg: bytes) -> None:
        if self._hello(arg, "EHLO", R.R501_EHLO_SYNTAX):
            self._esmtp = True
            size = R.EHLO_SIZE_LIMIT % self.max_bytes if self.max_bytes >= 0 else R.EHLO_SIZE
            if self.tls_offered and not self.tls:  # RFC 3207 4.2: never again after TLS
                size += R.EHLO_STARTTLS
            self._out.append(R.R250_EHLO % (self.hostname, arg.strip(b" "), size))
            self._count_junk()

    # --- the transaction ---
    def smtp_MAIL(self, arg: bytes) -> None:
        if self._sender is not None:
            self._error(R.R503_NESTED_MAIL, "nested MAIL command")
            return
        if arg[:5].upper() != b"FROM:":
            self._error(R.R501_MAIL_SYNTAX, "MAIL syntax", show(arg))
            return
        status, path, rest = address.split_path(arg[5:])
        if status != address.OK:
            self._bad_address(status, _path_text(arg[5:]), True)
            return
        mailbox = address.strip_source_route(path)
        shown = _logged_address(path if mailbox is None else mailbox)
        params = address.parse_params(rest)
        if params is None:
            self._error(R.R501_PARAM_SYNTAX, "MAIL parameter syntax", shown)
            return
        if params and not self._mail_params(params, shown):
            return
        if mailbox is None:
            status = address.SYNTAX
        elif mailbox:  # b"" is the null reverse-path <>, always allowed
            status = address.check_mailbox(mailbox, "SMTPUTF8" in params)
        if status != address.OK or mailbox is None:
            self._bad_address(status, shown, True)
            return
        if self.mail_check is not None:
            refusal = self.mail_check()
            if refusal is not None:
                # 4xx (spool space) is our trouble; 5xx (a session the access policy
                # denied) is the client's, and counts, so a MAIL loop ends at the limit.
                if refusal[0][:1] == b"5":
                    self._error(refusal[0], refusal[1], shown)
                else:
                    self._reject(refusal[0], refusal[1], shown)
                return
        self._sender = mailbox.decode("utf-8")
        self._params = params
        self.events.append(("mail", show(rest.strip()), shown, 250))
        self._reply(R.R250_SENDER_OK % (b"<" + mailbox + b">"))

    def _mail_params(self, params: dict[str, str], sender: str) -> bool:
        """Check MAIL parameters; False when a refusal was sent."""
        if not self._esmtp:
            self._error(R.R555_PARAM, "MAIL parameters without EHLO", sender)
            return False
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    self._error(R.R501_PARAM_SYNTAX, "bad SIZE=" + value[:40], sender)
                    return False
                if 0 <= self.max_bytes < int(value):
                    self._error(
                        R.R552_TOO_BIG, "declared SIZE=" + value + " over maxbytes", sender
                    )
                    return False
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(R.R501_PARAM_SYNTAX, "bad BODY=" + value[:40], sender)
                    return False
                params[key] = value.upper()
            elif key != "SMTPUTF8" or value:
                self._error(R.R555_PARAM, "unsupported MAIL parameter " + key[:40], sender)
                return False
        return True

    def _bad_address(self, status: int, shown: str, sender: bool) -> None:
        if status == address.TOO_LONG:
            reply, reason = R.R501_PATH_TOO_LONG, "path too long"
        elif status == address.DASH:
            reply = R.R553_SENDER_DASH if sender else R.R553_RCPT_DASH
            reason = "address starts with '-'"
        elif status == address.NEED_UTF8:
            reply, reason = R.R553_NEED_SMTPUTF8, "non-ASCII address without SMTPUTF8"
        elif status == address.CONTROL:
            reply = R.R501_BAD_SENDER if sender else R.R501_BAD_RCPT
            reason = "control character in address"
        else:
            reply = R.R501_BAD_SENDER if sender else R.R501_BAD_RCPT
            reason = "bad address syntax"
        self._error(reply, ("sender: " if sender else "recipient: ") + reason, shown)

    def smtp_RCPT(self, arg: bytes) -> None:
        if self._sender is None:
            self._error(R.R503_NEED_MAIL, "RCPT before MAIL")
            return
        if arg[:3].upper() != b"TO:":
            self._error(R.R501_RCPT_SYNTAX, "RCPT syntax", show(arg))
            return
        status, mailbox, rest = address.split_path(arg[3:])
        if status != address.OK:
            self._bad_address(status, _path_text(arg[3:]), False)
            return
        stripped = address.strip_source_route(mailbox)
        shown = _logged_address(mailbox if stripped is None else stripped)
        if rest.strip():
            self._error(R.R555_PARAM, "unsupported RCPT parameter", shown)
            return
        if stripped is None:
            status = address.SYNTAX
        elif stripped.lower() == b"postmaster":  # RFC 5321 4.5.1: always accepted
            mailbox = b"postmaster"
            shown = "postmaster"
        else:
            mailbox = stripped
            status = address.check_mailbox(mailbox, "SMTPUTF8" in self._params)
        if status != address.OK:
            self._bad_address(status, shown, False)
            return
        rcpt = mailbox.decode("utf-8")
        if 0 <= self.max_recipients <= len(self._rcpts):
            self._reject(R.R452_TOO_MANY_RCPTS, "too many recipients", rcpt)
            self._overshoot += 1
            if self._overshoot > limits.RECIPIENT_OVERSHOOT:
                self._count_error()
            return
        detail = ""
        if self.rcpt_check is not None:
            assert self._sender is not None
            refusal, detail, deny = self.rcpt_check(self._sender, rcpt)
            if refusal:
                if deny:
                    self._reset()
                self._error(refusal, detail, rcpt)
                return
        self._rcpts.append(rcpt)
        self.events.append(("rcpt", detail, rcpt, 250))
        self._reply(R.R250_RCPT_OK % (b"<" + mailbox + b">"))

    def smtp_DATA(self, arg: bytes) -> None:
        if arg.strip(b" "):
            self._error(R.R501_DATA_SYNTAX, "DATA syntax")
        elif self._sender is None:
            self._error(R.R503_NEED_MAIL, "DATA before MAIL")
        elif not self._rcpts:
            self._error(R.R503_NEED_RCPT, "DATA before RCPT")
        else:
            self._out.append(R.R354_DATA)
            # The data region starts with a virtual <CRLF>, so that "." on the first
            # line ends the data too and one search for <CRLF>.<CRLF> covers it all.
            buf = self._buf
            del buf[: self._pos]
            self._pos = 0
            buf[0:0] = b"\r\n"
            self._scan = 0
            self._line_start = 2
            self._state = _DATA

    def _data(self) -> bool:
        """Consume message data; True when the data ended and input goes on."""
        buf = self._buf
        i = buf.find(_DOT_END, self._scan)
        if i < 0:
            n = len(buf)
            if self._state == _DISCARD:
                del buf[: max(0, n - 4)]  # keep what may start a <CRLF>.<CRLF>
                self._scan = 0
                return False
            self._scan = max(0, n - 4)
            nl = buf.rfind(b"\n", self._line_start)
            if nl >= 0:
                self._line_start = nl + 1
            # Both tests are sure verdicts: a partial line over 1000 octets stays too
            # long after unstuffing, and unstuffing removes at most 1 octet in 4.
            if n - self._line_start > limits.TEXT_LINE_MAX:
                self._discard(R.R500_DATA_LINE_TOO_LONG)
            elif self.max_bytes >= 0 and 3 * (n - 2) > 4 * (self.max_bytes + 1):
                self._discard(R.R552_TOO_BIG)
            return False
        end = i + 2
        if self.strict_sync and not self._esmtp and len(buf) > end + 3:
            self._out_of_sync("the end of data")  # a HELO session may not pipeline
            return False
        reply = self._data_reply if self._state == _DISCARD else self._finish(end)
        del buf[: end + 3]
        self._scan = 0
        if reply:
            self._state = _CMD
            self._error(reply, _DATA_REASONS[reply], self._sender or "<>")
            self._reset()
            return True
        return False  # _finish() set pending

    def _discard(self, reply: bytes) -> None:
        self._state = _DISCARD
        self._data_reply = reply
        buf = self._buf
        del buf[: max(0, len(buf) - 4)]
        self._scan = 0

    def _finish(self, end: int) -> bytes:
        """Check the complete data in buf[2:end]; set ``pending`` or return a refusal."""
        buf = self._buf
        cr = buf.count(b"\r", 2, end)
        if cr != buf.count(b"\n", 2, end) or cr != buf.count(b"\r\n", 2, end):
            return R.R550_BARE_NEWLINE
        if buf.find(b"\0", 2, end) >= 0:
            return R.R550_NUL
        raw = buf[:end]
        if b"\r\n." in raw:
            raw = raw.replace(b"\r\n.", b"\r\n")
        del raw[:2]
        body = bytes(raw)
        if 0 <= self.max_bytes < len(body):
            return R.R552_TOO_BIG
        if len(body) > limits.TEXT_LINE_CONTENT_MAX and (
            max(map(len, body.split(b"\r\n"))) > limits.TEXT_LINE_CONTENT_MAX
        ):
            return R.R500_DATA_LINE_TOO_LONG
        assert self._sender is not None
        self.pending = Envelope(
            self._sender,
            self._rcpts,
            body,
            self._helo,
            self._protocol(),
            self._params,
        )
        self._state = _PENDING
        return b""

    def _protocol(self) -> str:
        """The Received: "with" protocol type (RFC 3848; RFC 6531 3.7.3 for SMTPUTF8).

        No AUTH here, so never the ...A variants.  SMTPUTF8 is only accepted after
        EHLO, so UTF8SMTP implies ESMTP.
        """
        tls = "S" if self.tls else ""
        if "SMTPUTF8" in self._params:
            return "UTF8SMTP" + tls
        # Postfix: a HELO session stays SMTP even over TLS (RFC 3848 names ESMTPS only).
        return "ESMTP" + tls if self._esmtp else "SMTP"

    # --- the other commands ---
    def smtp_RSET(self, arg: bytes) -> None:
        self._reset()
        self._junk(R.R250_RESET)

    def smtp_NOOP(self, arg: bytes) -> None:
        self._junk(R.R250_OK)

    def smtp_QUIT(self, arg: bytes) -> None:
        self._reply(R.R221_BYE)
        self._close("quit")

    def smtp_VRFY(self, arg: bytes) -> None:
        if not arg.strip(b" "):
            self._error(R.R501_VRFY_SYNTAX, "VRFY syntax")
            return
        # RFC 5321 3.5.3 allows 252: nothing about local users is revealed.
        self.events.append(("vrfy", show(arg), "", 252))
        self._junk(R.R252_VRFY)

    def smtp_EXPN(self, arg: bytes) -> None:
        self.events.append(("expn", show(arg), "", 502))
        self._junk(R.R502_EXPN)

    def smtp_STARTTLS(self, arg: bytes) -> None:
        if not self.tls_offered:
            self._error(R.R502_NOT_IMPLEMENTED, "STARTTLS not offered")
        elif self.tls:
            self._error(R.R554_TLS_ACTIVE, "STARTTLS after TLS")
        elif arg.strip(b" "):
            self._error(R.R501_STARTTLS_SYNTAX, "STARTTLS syntax")
        else:
            self._reply(R.R220_STARTTLS)
            self._state = _TLS_WAIT
            # CVE-2011-0411: what the client pipelined behind STARTTLS came in
            # plaintext and must never run as if it came over TLS.  Postfix and
            # aiosmtpd drop it (RFC 3207 4: STARTTLS ends a pipelined group).
            left = len(self._buf) - self._pos
            if left:
                self.events.append(
                    ("reject", f"{left} octets pipelined after STARTTLS discarded", "", 0)
                )
            self._pos = len(self._buf)

    def smtp_HELP(self, arg: bytes) -> None:
        self._junk(R.R214_HELP)
