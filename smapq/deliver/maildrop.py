"""``smapq-maildrop``: a tiny sendmail-compatible program that delivers into a Maildir.

Purpose: lets the demo (and anyone without an MTA) run ``smapq deliver`` end to end:
``smapq-maildrop -oi -f SENDER -- RCPT...`` reads the message on stdin and writes it as
one file in ``$SMAPQ_MAILDIR/new/`` (default ``./Maildir``), with ``Return-Path:`` and
``Delivered-To:`` lines in front, as local delivery agents do. One file per message,
however many recipients.

Security: no shell, no network, no privileges: it writes as whoever runs it. The file
is created 0600 in ``tmp/`` with O_EXCL, fsynced, renamed into ``new/`` and the
directory fsynced (the Maildir protocol, plus the fsyncs that make exit 0 mean
"stored").

Standards: the Maildir protocol (unique name ``time.M<usec>P<pid>R<random>.host``);
sendmail options ``-oi``/``-i`` (accepted: the body is never scanned for "."),
``-f``/``-r`` sender (``<>`` is the null sender), ``--`` ends options; other single
letter options are ignored like Postfix's sendmail ignores them.

Diagnostics: sysexits: 64 usage, 73 cannot create the Maildir, 74 I/O error,
75 out of space or quota (temporary); one line on stderr.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time

EX_OK = 0
EX_USAGE = 64
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
MAILDIR_ENV = "SMAPQ_MAILDIR"


class Usage(Exception):
    pass


def parse(args: list[str]) -> tuple[str, list[str]]:
    """(sender, recipients) from a sendmail command line."""
    sender = ""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg[1:2] in ("f", "r"):
            if len(arg) > 2:
                sender = arg[2:]
            elif i + 1 < len(args):
                i += 1
                sender = args[i]
            else:
                raise Usage(f"option {arg} needs a sender")
        i += 1
    rcpts = args[i:]
    if not rcpts:
        raise Usage("no recipients given")
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1]
    return sender, rcpts


def _unique_name() -> str:
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}R{os.urandom(4).hex()}.{host}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(maildir: str, sender: str, rcpts: list[str], body: bytes) -> str:
    """Store one message; returns the path of the new file."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), mode=0o700, exist_ok=True)
    head = f"Return-Path: <{sender}>\nDelivered-To: {', '.join(rcpts)}\n"
    name = _unique_name()
    tmp = os.path.join(maildir, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(head.encode("utf-8", "surrogateescape") + body)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    final = os.path.join(maildir, "new", name)
    os.rename(tmp, final)
    _fsync_dir(os.path.join(maildir, "new"))
    return final


USAGE = "usage: smapq-maildrop [-oi] -f SENDER [--] RECIPIENT..."
HELP = f"""{USAGE}

Deliver the message on stdin into the Maildir $SMAPQ_MAILDIR (default ./Maildir), one
file for all recipients, with Return-Path: and Delivered-To: in front. A sendmail
stand-in for 'smapd: sendmail' on hosts without an MTA. Exit status: 0 stored,
64 usage, 73 cannot create the Maildir, 74 I/O error, 75 out of space (try later).
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--help"]:
        sys.stdout.write(HELP)
        return EX_OK
    try:
        sender, rcpts = parse(args)
    except Usage as exc:
        print(f"smapq-maildrop: {exc}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return EX_USAGE
    maildir = os.environ.get(MAILDIR_ENV) or "Maildir"
    body = sys.stdin.buffer.read()
    try:
        deliver(maildir, sender, rcpts, body)
    except OSError as exc:
        print(f"smapq-maildrop: {maildir}: {exc.strerror or exc}", file=sys.stderr)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return EX_TEMPFAIL
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EROFS):
            return EX_CANTCREAT
        return EX_IOERR
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
