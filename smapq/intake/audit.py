"""The envelope log of one SMTP connection: ``events`` rows and syslog lines.

Purpose: turn the session's events (smapq.smtp.session: tuples of kind, detail,
address, code) into rows for the ``events`` table and FWTK-style syslog lines, in
dialogue order, and keep the rows until a commit takes them.  Both transports log
through this one class, so the inetd receiver and ``smapq serve`` write identical
rows and lines.

Rows of the open transaction (its mail, rcpt and reject rows) are remembered in
``txn``: they get the queue id when the message is stored.  Rows before it can be
written at any time; ``take_loose`` hands them out once there are too many, so a
long session never holds an unbounded list (the session bounds its events too).

Diagnostics: syslog ident ``smap``, facility mail, one line per recipient like FWTK
smap (``host=NAME/IP bytes=N from=<S> to=<R> id=QUEUEID``), ``connect``/``exiting``
lines, and ``fwtkcfgerr:`` / ``fwtksyserr:`` / ``securityalert:`` prefixes.  The
client name is "unknown": no DNS lookups are done.

Lean: stdlib only (the log sink is a plain callable the transport provides).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from smapq.intake.port import EventRow

    LogSink = Callable[[int, str], None]

# syslog priorities (syslog.h); the syslog module is the transport's business.
LOG_CRIT = 2
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6

# Rows kept in memory before the ones that belong to no open transaction are handed
# out for writing on their own (the session bounds them too; this bounds the process).
FLUSH_ROWS = 1000


def _stored_address(addr: str) -> str | None:
    """events.address for a session event's address: "<>" -> "", "" -> NULL."""
    if addr == "<>":
        return ""
    return addr or None


class Audit:
    """Event rows and log lines of one connection (see the module docstring)."""

    __slots__ = ("addr", "log", "messages", "rows", "session_id", "txn", "volume", "who")

    def __init__(self, session_id: str, addr: str, log: LogSink | None) -> None:
        self.session_id = session_id
        self.addr = addr
        self.who = f"unknown/{addr or 'unknown'}"
        self.log = log
        self.rows: list[EventRow] = []  # not yet written, in order
        self.txn: list[EventRow] = []  # the open transaction's own rows (also in rows)
        self.messages = 0
        self.volume = 0

    def say(self, priority: int, text: str) -> None:
        if self.log is not None:
            self.log(priority, text[:1000])

    def row(self, at: float, kind: str, detail: str, addr: str | None, code: int) -> EventRow:
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

    def note(self, kind: str, detail: str) -> None:
        """A row the session did not make (the transport's, e.g. ``jail``)."""
        self.rows.append(self.row(time.time(), kind, detail, None, 0))

    def take(self, events: list[tuple[str, str, str, int]]) -> None:
        """Turn the session's new events into rows and log lines; clears ``events``."""
        now = time.time()
        for kind, detail, addr, code in events:
            if kind == "accept":
                continue  # its row is made by the core, with the message itself
            # The session says "<>" for the null sender, stored as messages.mail_from
            # stores it (""), so reports can match refusals to senders.
            row = self.row(now, kind, detail, _stored_address(addr), code)
            self.rows.append(row)
            if kind == "mail":
                self.txn = [row]
            elif kind in ("rcpt", "reject") and self.txn:
                self.txn.append(row)
            if self.log is not None:
                self._line(kind, detail, addr, code)
        events.clear()

    def _line(self, kind: str, detail: str, addr: str, code: int) -> None:
        if kind == "connect":
            self.say(LOG_INFO, f"connect host={self.who}")
        elif kind == "reject":
            alert = "securityalert: " if "'-'" in detail else ""
            self.say(
                LOG_NOTICE,
                f"{alert}reject host={self.who} code={code} reason={detail} address={addr}",
            )
        elif kind == "tls":
            self.say(LOG_INFO if code else LOG_NOTICE, f"TLS host={self.who} {detail}")
        elif kind in ("vrfy", "expn"):
            self.say(LOG_NOTICE, f"{kind.upper()} {detail} ({self.who})")
        elif kind == "timeout":
            self.say(LOG_NOTICE, f"timeout - exiting host={self.who} {detail}".rstrip())
        elif kind == "disconnect":
            what = "exiting" if self.messages else "exiting with no message"
            self.say(
                LOG_INFO,
                f"{what} host={self.who} messages={self.messages} bytes={self.volume} "
                f"reason={detail}",
            )

    def stored(self, queue_id: str, sender: str, recipients: list[str], size: int) -> None:
        """The message and every row so far are committed."""
        self.rows = []
        self.txn = []
        self.messages += 1
        self.volume += size
        for rcpt in recipients:
            self.say(
                LOG_INFO, f"host={self.who} bytes={size} from=<{sender}> to=<{rcpt}> id={queue_id}"
            )

    def take_loose(self, everything: bool = False) -> list[EventRow]:
        """Rows that may be written now: all of them (``everything``), or, once there
        are more than FLUSH_ROWS, those before the open transaction."""
        if everything:
            rows, self.rows, self.txn = self.rows, [], []
            return rows
        if len(self.rows) <= FLUSH_ROWS:
            return []
        cut = len(self.rows)
        if self.txn:
            first = self.txn[0]
            cut = next(i for i, row in enumerate(self.rows) if row is first)
        rows = self.rows[:cut]
        del self.rows[:cut]
        return rows
