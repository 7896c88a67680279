"""Delivery status notifications: the bytes of the message a sender is told with.

Purpose: render one RFC 3464 report -- a failure ("bounce") or a delay warning -- as a
multipart/report message: a text part for people, the message/delivery-status part
for programs, and the headers of the message reported on. Pure: no I/O, no database;
smapq/deliver/notices.py decides who gets one and queues it.

What goes back: the original message's header block (with our Received: trace), as
text/rfc822-headers, never its body. RFC 3461 6.2 returns full content only when the
client asked with RET=FULL, and smap does not offer the DSN extension; most failures
worth telling are of mail that was never wanted (spam from forged senders, whose
content would be backscatter); bodies can be ``maxbytes`` large; and the whole message
stays in the queue (state bad, ``smapq queue export``) and in ``baddir`` for the
postmaster. The headers are cut at HEADERS_MAX (Postfix's bounce_size_limit).

Status codes (RFC 3463): an SMTP reply with an enhanced code in sendmail's output
("550 5.1.1 ...", or a line starting "5.1.1") is the most precise and is used when its
class fits the report (5 failed, 4 delayed); else the exit code is mapped like
Postfix's sys_exits table (67 EX_NOUSER 5.1.1, 68 EX_NOHOST 5.1.2, 65 EX_DATAERR 5.6.0,
...; unknown 5.3.0), with the class set to the report's. A message that ran out of
``maxqueuetime`` is reported failed with 4.4.7 ("delivery time expired", which RFC 3463
calls useful only as a persistent transient error; Sendmail does the same), the last
attempt's result in Diagnostic-Code.

Standards: RFC 3464 (fields per message and per recipient; the report part is 7bit,
so a non-ASCII address is given with RFC 6533's ``utf-8`` address type in its xtext
form), RFC 6522 (multipart/report), RFC 3834 5.2 (``Auto-Submitted: auto-replied``),
RFC 5322 (dates with a numeric zone, lines below 998 octets). The header From: is the
postmaster of the reporting host, as RFC 3464 2 advises: a reply reaches a person
(RFC 5321 4.5.1 requires the mailbox to exist).

Security: every address and every text comes from the network or from sendmail's
output: control characters never reach a header or a report field (they are replaced,
or escaped in addresses), long texts are cut and folded, and the MIME boundary is
random and checked against everything it separates.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

from smapq import __version__

FAILED = "failed"
DELAYED = "delayed"

HEADERS_MAX = 50_000  # octets of the original's headers returned (bounce_size_limit)
DIAG_MAX = 1000  # characters of a Diagnostic-Code (sendmail output can be outputmax)
WIDTH = 76  # fold report fields and wrap text here
LINE_MAX = 998  # RFC 5322 2.1.1

EXPIRED_STATUS = "4.4.7"
# Postfix's global/sys_exits.c: sysexits code -> RFC 3463 status.
SYSEXITS_STATUS = {
    64: "5.3.0",
    65: "5.6.0",
    66: "5.3.0",
    67: "5.1.1",
    68: "5.1.2",
    69: "5.3.0",
    70: "5.3.0",
    71: "4.3.0",
    72: "5.3.0",
    73: "5.2.0",
    74: "5.3.0",
    75: "4.3.0",
    76: "5.5.0",
    77: "5.7.0",
    78: "5.3.5",
}
UNKNOWN_STATUS = "5.3.0"
REFUSED_STATUS = "5.1.3"  # an address smapd would not pass to sendmail (bad syntax)

_BANNER = "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #"
# "550 5.1.1 <bob@x>: ..." anywhere in a line of output, or a line starting "5.1.1".
_REPLY = re.compile(r"(?<![\d.])([245])\d\d[ -]([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
# policy.ChildResult.describe's head, "exit 67 (EX_NOUSER): ", before the first line.
_HEAD = re.compile(r"^exit -?\d+(?: \(\w+\))?(?::\s*|$)")
_CODE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")


class Entry:
    """One recipient of the report: its address, status and what the last try said."""

    __slots__ = ("address", "diagnostic", "status")

    def __init__(self, address: str, status: str, diagnostic: str | None) -> None:
        self.address = address
        self.status = status
        self.diagnostic = diagnostic  # "type; text", e.g. "smtp; 550 5.1.1 ..."


class Report:
    """What one notice says; ``render`` turns it into the message."""

    __slots__ = (
        "about",
        "action",
        "arrival",
        "entries",
        "headers",
        "host",
        "last_attempt",
        "retry_until",
        "sender",
    )

    def __init__(
        self,
        action: str,
        host: str,
        about: str,
        sender: str,
        arrival: float,
        last_attempt: float,
        entries: Sequence[Entry],
        headers: bytes | None,
        retry_until: float | None = None,
    ) -> None:
        self.action = action  # FAILED or DELAYED
        self.host = _ascii(host)  # Reporting-MTA; the domain of From: and Message-ID:
        self.about = about  # the queue id of the message reported on
        self.sender = sender  # the original reverse-path: the notice's one recipient
        self.arrival = arrival
        self.last_attempt = last_attempt
        self.entries = list(entries)
        self.headers = headers  # the original's trace + header block, or None
        self.retry_until = retry_until  # DELAYED only


# --- status and diagnostic --------------------------------------------------------


def status_of(action: str, code: int | None, result: str, expired: bool = False) -> Entry:
    """Status and Diagnostic-Code for a recipient whose last try ended with sendmail's
    exit ``code`` (None: a signal, a timeout, no run at all) and ``result`` (the
    one-line last result smapd recorded). The address is filled in by the caller."""
    klass = "5" if action == FAILED else "4"
    found = _from_output(result)
    diagnostic = f"smtp; {found[1]}" if found else f"x-unix; {result}" if result else None
    if expired:
        return Entry("", EXPIRED_STATUS, diagnostic)
    if found and found[0][0] == klass:
        return Entry("", found[0], diagnostic)
    if result.startswith("refused: "):
        base = REFUSED_STATUS
    elif code is None:
        base = "4.3.0"  # killed, timed out, not run: a local, temporary condition
    else:
        base = SYSEXITS_STATUS.get(code, UNKNOWN_STATUS)
    return Entry("", klass + base[1:], diagnostic)


def _from_output(result: str) -> tuple[str, str] | None:
    """(enhanced status, the reply text from its code on) from sendmail's output, if
    it quotes an SMTP reply or starts a line with a status code."""
    for segment in result.split(" | "):
        line = _HEAD.sub("", segment, count=1)
        match = _REPLY.search(line)
        if match and match.group(1) == match.group(2):
            return ".".join(match.group(2, 3, 4)), line[match.start() :]
        match = _CODE.match(line.strip())
        if match:
            return ".".join(match.group(1, 2, 3)), line.strip()
    return None


# --- the message ------------------------------------------------------------------


def render(report: Report, queue_id: str, now: float) -> bytes:
    """The notice as it is queued (CRLF lines; 8bit only where an address or the
    original's headers are not ASCII)."""
    text = _human(report).encode("utf-8", "replace")
    status = _status_part(report).encode("ascii")
    headers = _headers_part(report.headers)
    parts = [
        (
            "Notification",
            "text/plain; charset=" + ("us-ascii" if text.isascii() else "utf-8"),
            text,
        ),
        ("Delivery report", "message/delivery-status", status),
    ]
    if headers is not None:
        what = "Undelivered" if report.action == FAILED else "Delayed"
        parts.append((f"{what} Message Headers", "text/rfc822-headers", headers))
    boundary = _boundary(queue_id, [p[2] for p in parts])
    eight = not all(p[2].isascii() for p in parts)
    subject = (
        "Undelivered Mail Returned to Sender"
        if report.action == FAILED
        else "Delayed Mail (still being retried)"
    )
    head = [
        f"From: Mail Delivery System <postmaster@{report.host}>",
        _long(f"To: <{_printable(report.sender)}>"),
        f"Subject: {subject}",
        f"Date: {rfc5322_date(now)}",
        f"Message-ID: <{queue_id}.{int(now)}@{report.host}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        f"Content-Transfer-Encoding: {'8bit' if eight else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = [("\r\n".join(head) + "\r\n").encode("utf-8", "replace")]
    for description, ctype, data in parts:
        cte = "" if ctype.startswith("message/") else _cte(data)
        out.append(
            f"--{boundary}\r\nContent-Description: {description}\r\n"
            f"Content-Type: {ctype}\r\n{cte}\r\n".encode("ascii")
        )
        out.append(data if data.endswith(b"\r\n") else data + b"\r\n")
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


def trace(host: str, queue_id: str, now: float) -> str:
    """The notice's own Received: line (it was made here, not received)."""
    return (
        f"Received: by {host} via smapd (smapq {__version__})\r\n"
        f"\tid {queue_id}; {rfc5322_date(now)}\r\n"
    )


def rfc5322_date(when: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(when))


def _cte(data: bytes) -> str:
    return f"Content-Transfer-Encoding: {'7bit' if data.isascii() else '8bit'}\r\n"


def _boundary(queue_id: str, contents: Sequence[bytes]) -> str:
    # "=_" cannot occur in quoted-printable text; the random part makes a collision
    # with the original's headers (which a sender chooses) a matter of luck, and the
    # check below makes it impossible.
    while True:
        boundary = f"=_smapq.{queue_id}.{os.urandom(6).hex()}"
        token = boundary.encode("ascii", "replace")
        if not any(token in c for c in contents):
            return boundary


def _human(r: Report) -> str:
    lines = [f"This is the mail system at {r.host}.", ""]
    when = rfc5322_date(r.arrival)
    if r.action == FAILED:
        lines += _wrap(
            f"Your message (queue id {r.about}, received {when}) could not be "
            "delivered to the recipients below. This is a permanent failure: the "
            "message will not be tried again."
        )
    else:
        lines += ["#" * len(_BANNER), _BANNER, "#" * len(_BANNER), ""]
        until = rfc5322_date(r.retry_until or r.last_attempt)
        lines += _wrap(
            f"Your message (queue id {r.about}, received {when}) has not yet been "
            f"delivered to the recipients below. It will be tried again until {until}; "
            "if it still cannot be delivered by then, you will be told."
        )
    lines.append("")
    for e in r.entries:
        said = e.diagnostic.split("; ", 1)[-1] if e.diagnostic else "no reason recorded"
        lines += _wrap(f"<{_printable(e.address)}>: {e.status} {_printable(said)}")
    lines.append("")
    if r.headers is not None:
        lines += _wrap("The headers of your message are attached.")
    lines += _wrap(f"Replies to this message go to the postmaster of {r.host}.")
    return "\r\n".join(lines) + "\r\n"


def _status_part(r: Report) -> str:
    fields = [
        f"Reporting-MTA: dns; {r.host}",
        f"X-Smapq-Queue-ID: {r.about}",
        _long(f"X-Smapq-Sender: {_address_field(r.sender)}"),
        f"Arrival-Date: {rfc5322_date(r.arrival)}",
        "",
    ]
    for e in r.entries:
        fields += [
            _long(f"Final-Recipient: {_address_field(e.address)}"),
            f"Action: {r.action}",
            f"Status: {e.status}",
        ]
        if e.diagnostic:
            fields.append(_fold(f"Diagnostic-Code: {_ascii(e.diagnostic)[:DIAG_MAX]}"))
        fields.append(f"Last-Attempt-Date: {rfc5322_date(r.last_attempt)}")
        if r.action == DELAYED and r.retry_until is not None:
            fields.append(f"Will-Retry-Until: {rfc5322_date(r.retry_until)}")
        fields.append("")
    return "\r\n".join(fields)


def _headers_part(data: bytes | None) -> bytes | None:
    """The original's trace and header block: CRLF lines, none over LINE_MAX, at most
    HEADERS_MAX octets (cut at a line end)."""
    if data is None:
        return None
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    block = data[: min(ends)] if ends else data
    lines = re.split(rb"\r\n|\r|\n", block[: HEADERS_MAX + LINE_MAX])
    out: list[bytes] = []
    size = 0
    for whole in lines:
        line = whole[:LINE_MAX]
        if size + len(line) + 2 > HEADERS_MAX:
            break
        out.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(out)


def _address_field(address: str) -> str:
    """``rfc822; addr`` for a printable ASCII address; else RFC 6533's ``utf-8`` type in
    its xtext form (every character outside QCHAR as ``\\x{HEX}``)."""
    if address and all(0x21 <= ord(c) <= 0x7E for c in address):
        return f"rfc822; {address}"
    return "utf-8; " + "".join(c if _qchar(c) else f"\\x{{{ord(c):X}}}" for c in address)


def _qchar(c: str) -> bool:
    return 0x21 <= ord(c) <= 0x7E and c not in "+=\\"


def _printable(text: str) -> str:
    """``text`` with control characters (and lone surrogates) replaced by '?'."""
    return "".join(
        "?" if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 else c
        for c in text
    )


def _ascii(text: str) -> str:
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)


def _fold(field: str) -> str:
    """Fold a report field at spaces (a word over WIDTH is split: it is free text)."""
    words: list[str] = []
    for word in field.split(" "):
        words += [word[i : i + WIDTH] for i in range(0, len(word), WIDTH)] or [""]
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > WIDTH:
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return "\r\n".join(lines)


def _long(field: str) -> str:
    """A field as it is, unless it would break the line limit: then folded (an address
    that long -- possible only as escapes of a long non-ASCII one -- is mangled by the
    fold, and still better than a message every relay refuses)."""
    return field if len(field.encode("utf-8", "replace")) <= LINE_MAX else _fold(field)


def _wrap(text: str) -> list[str]:
    """Wrap prose at WIDTH, for the text part."""
    return _fold(text).replace("\r\n ", "\r\n").split("\r\n")
