"""Export a message that went bad to ``smapd: baddir``, the FWTK habit.

Purpose: ``<queue_id>.eml`` is the message as sendmail would have read it (trace header
+ body, RFC 5322), ``<queue_id>.envelope`` the FWTK-style envelope (``FROM <sender>``,
one ``RCPT <addr>`` per recipient) plus why it went bad. The row stays in the database
in state ``bad`` either way; the files are a copy for people and scripts.

``export_bad`` is the deliverer's step after a message went bad: read it back (the
outcome is already committed), write the files, record an ``exported`` event. A
failure to export is logged and never changes the message's state.

Security: files are created 0600 with O_EXCL under a temporary name, fsynced, then
renamed into place (a reader never sees half a file), and the directory is fsynced.
Names come from the queue id (Crockford base32, no path characters).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from smapq.store import faults, queries

FILE_MODE = 0o600


def _write(directory: str, name: str, data: bytes) -> str:
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, final)
    return final


def envelope_text(
    queue_id: str, sender: str, addresses: Sequence[str], reason: str, attempts: int
) -> bytes:
    lines = [f"QUEUEID {queue_id}", f"FROM <{sender}>"]
    lines += [f"RCPT <{a}>" for a in addresses]
    lines += [f"ATTEMPTS {attempts}", f"REASON {reason}"]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def export(
    directory: str,
    queue_id: str,
    message: bytes,
    sender: str,
    addresses: Sequence[str],
    reason: str,
    attempts: int,
) -> str:
    """Write both files; returns the .eml path. Raises OSError on failure."""
    if not queue_id or "/" in queue_id or queue_id.startswith("."):
        raise OSError(f"unsafe queue id {queue_id!r}")
    path = _write(directory, f"{queue_id}.eml", message)
    _write(
        directory,
        f"{queue_id}.envelope",
        envelope_text(queue_id, sender, addresses, reason, attempts),
    )
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def export_bad(
    conn: Connection,
    directory: str,
    message_id: int,
    queue_id: str,
    reason: str,
    log: logging.Logger,
) -> None:
    """Export a message that went bad to ``directory`` and record it; never raises for
    a file or database problem (the message stays bad in the queue either way)."""
    try:
        with conn.begin():
            row = queries.message_by_queue_id(conn, queue_id)
            rcpts = queries.recipients_of(conn, message_id) if row is not None else []
        if row is None:
            return
        trace = (row.trace or "").encode("utf-8", "surrogateescape")
        path = export(
            directory, queue_id, trace + bytes(row.body or b""),
            str(row.mail_from), [r.address for r in rcpts], reason, int(row.attempts),
        )  # fmt: skip
        with conn.begin():
            queries.add_event(conn, "exported", queue_id=queue_id, detail=path)
    except OSError as exc:
        log.error("%s: cannot export to baddir %s: %s", queue_id, directory, exc)
    except DBAPIError as exc:
        log.error("%s: not exported to baddir: %s", queue_id, faults.describe(exc))
