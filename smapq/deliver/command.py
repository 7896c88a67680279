"""The sendmail command line: ``[sendmail, "-oi", "-f", sender, "--", rcpt...]``.

Purpose: build argv for each batch of at most ``maxrcptbatch`` recipients.

Security: argv only, never a shell. Every element that came from the network (the
sender and each recipient) is refused if it starts with ``-`` (it would be an option
to sendmail; FWTK smapd only skipped such recipients), is empty, or holds a NUL or a
control character. ``--`` ends option parsing as well, for the sendmails that honour
it. ``-oi`` stops a body line "." from ending the message (the FWTK flaw).

Standards: the null reverse-path (RFC 5321 4.5.5) is passed as ``-f "<>"``: Postfix's
sendmail parses the -f argument as an RFC 822 address, so ``<>`` becomes the empty
sender; Sendmail and Exim document ``<>`` as the null sender too. A sender stored with
its angle brackets is unwrapped first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

NULL_SENDER = "<>"


class Refused(Exception):
    """An envelope address that must never reach sendmail's argv."""


def sender_arg(mail_from: str) -> str:
    """The -f argument for a stored MAIL FROM path."""
    path = mail_from.strip()
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    if not path:
        return NULL_SENDER
    _check("sender", path)
    return path


def _check(what: str, value: str) -> None:
    if not value:
        raise Refused(f"empty {what} address")
    if value.startswith("-"):
        raise Refused(f"{what} {value!r} starts with '-' (would be a sendmail option)")
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise Refused(f"{what} {value!r} holds a control character")


def check_recipients(addresses: Sequence[str]) -> None:
    for address in addresses:
        _check("recipient", address)


def argv(sendmail: str, sender: str, addresses: Sequence[str]) -> list[str]:
    """argv for one batch; ``sender`` comes from ``sender_arg``, addresses are checked."""
    check_recipients(addresses)
    return [sendmail, "-oi", "-f", sender, "--", *addresses]


def batches(items: Sequence[object], size: int) -> Iterator[range]:
    """Index ranges of at most ``size`` items, in order."""
    for start in range(0, len(items), size):
        yield range(start, min(start + size, len(items)))
