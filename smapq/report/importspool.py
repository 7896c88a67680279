"""``smapq import-spool DIR``: bring an FWTK smap spool into the queue as ``received`` rows.

Format (smap.c 1.6): files named ``sma*``, written mode 0600 under a lock and chmod'ed
0700 when complete (no rename, no fsync)::

    FROM <sender>
    RCPT <addr>          one per recipient, in reverse order of the RCPT commands
    BODY
    Received: from <name>(<ip>) by <host> via smap (<ver>)
    \tid <smaXXXXXX>; <ctime>
    <body, LF line endings>

smap's own ``Received:`` header (first body line and its continuation lines) goes to
``messages.trace``, not the body, so the deliverer prepends it exactly once.

Rules: a file is imported only when complete (owner-execute bit set) and not locked
(neither flock nor fcntl); anything else is reported and left in place for a later run.
A malformed file (no FROM, no RCPT, no BODY, a line before BODY that is neither) is
reported and left. Imported files are moved to ``DIR/imported/`` after their commit.
Exactly once: each import records an ``imported`` event keyed by file name and SHA-256
of the whole file; a file whose key is already recorded (a crash between commit and
move) is only moved. Recipients starting with ``-`` are dropped and reported, as smapd
did, because they would reach sendmail's argv as options.

Security: run by the administrator with smap and smapd stopped; files are opened with
O_NOFOLLOW and must be regular files; nothing in a file is executed or interpreted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import stat
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine

from smapq.errors import SmapqError, UsageError
from smapq.store import queries, states
from smapq.store.ids import new_queue_id

IMPORTED_DIR = "imported"
BATCH = 200
_RECEIVED = re.compile(r"^Received: from (\S*?)\s*\(([^)]*)\)")

# Outcomes of one file.
IMPORTED = "imported"
ALREADY = "already imported"
INCOMPLETE = "incomplete"
LOCKED = "locked"
MALFORMED = "malformed"


class Malformed(Exception):
    """A spool file that does not follow smap's FROM/RCPT/BODY layout."""


class SpoolMessage:
    """One parsed spool file."""

    __slots__ = ("body", "client_addr", "client_name", "dropped", "mail_from", "rcpts", "trace")

    def __init__(self) -> None:
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.dropped: list[str] = []
        self.trace = ""
        self.body = b""
        self.client_addr: str | None = None
        self.client_name: str | None = None


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def address(raw: str) -> str:
    """``<a@b> SIZE=1`` / `` <a@b>`` / ``a@b`` -> ``a@b``; ``<>`` -> ``""`` (smap kept it raw)."""
    raw = raw.strip()
    if raw.startswith("<") and ">" in raw:
        return raw[1 : raw.index(">")].strip()
    return raw.split()[0] if raw else ""


def parse(data: bytes) -> SpoolMessage:
    """Parse a whole spool file; raises Malformed with the reason."""
    msg = SpoolMessage()
    pos = 0
    seen_from = False
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise Malformed("no BODY line")
        line = data[pos:end].rstrip(b"\r")
        pos = end + 1
        if not seen_from:
            if not line.startswith(b"FROM "):
                raise Malformed("does not start with FROM")
            msg.mail_from = address(_text(line[5:]))
            seen_from = True
        elif line.lstrip().startswith(b"RCPT "):
            rcpt = address(_text(line.lstrip()[5:]))
            if not rcpt:
                raise Malformed("empty RCPT line")
            (msg.dropped if rcpt.startswith("-") else msg.rcpts).append(rcpt)
        elif line == b"BODY":
            break
        else:
            raise Malformed(f"unexpected envelope line {_text(line[:40])!r}")
    if not msg.rcpts:
        raise Malformed("no usable RCPT line")
    msg.rcpts.reverse()  # smap wrote them in reverse order of the RCPT commands
    body = data[pos:]
    if body.startswith(b"Received:"):
        end = body.find(b"\n")
        while end >= 0 and body[end + 1 : end + 2] in (b" ", b"\t"):
            end = body.find(b"\n", end + 1)
        # trace keeps its own line endings: the deliverer sends trace + body verbatim.
        head, body = (body, b"") if end < 0 else (body[: end + 1], body[end + 1 :])
        msg.trace = _text(head)
        match = _RECEIVED.match(msg.trace)
        if match:
            msg.client_name = match.group(1) or None
            msg.client_addr = match.group(2) or None
    msg.body = body
    return msg


def _locked(fd: int) -> bool:
    """True if another process holds a BSD (flock) or POSIX (fcntl) lock on the file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return True
        raise
    return False


class FileResult:
    """What happened to one file; ``alert``: an operator must hear of it even when quiet."""

    __slots__ = ("alert", "name", "queue_id", "reason", "status")

    def __init__(
        self, name: str, status: str, reason: str = "", queue_id: str = "", alert: bool = False
    ) -> None:
        self.name = name
        self.status = status
        self.reason = reason
        self.queue_id = queue_id
        self.alert = alert

    def line(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        if self.status == IMPORTED:
            return f"{self.name}: imported as {self.queue_id}{why}"
        return f"{self.name}: {self.status}{why}"


def _read(directory: str, name: str) -> tuple[bytes, os.stat_result] | FileResult:
    """The file's bytes and stat, or why it is left alone."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return FileResult(name, MALFORMED, f"cannot open: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return FileResult(name, MALFORMED, "not a regular file")
        if not st.st_mode & stat.S_IXUSR:
            return FileResult(name, INCOMPLETE, f"mode {stat.S_IMODE(st.st_mode):04o}")
        if _locked(fd):
            return FileResult(name, LOCKED, "smap still holds its lock")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _move(directory: str, name: str, target_dir: str) -> str:
    target = os.path.join(target_dir, name)
    n = 0
    while os.path.lexists(target):
        n += 1
        target = os.path.join(target_dir, f"{name}.{n}")
    try:
        os.rename(os.path.join(directory, name), target)
    except OSError as exc:
        # Committed already: the next run recognises the file's key and only moves it.
        raise SmapqError(
            f"{name}: imported, but cannot move it to {target_dir}: {exc.strerror}; "
            "fix that and run again (it will only be moved, not imported twice)"
        ) from None
    return target


def _check_target(directory: str, target: str) -> None:
    """Imported files are renamed, so the target must be a directory on DIR's filesystem."""
    try:
        st = os.stat(target)
    except OSError as exc:
        raise UsageError(f"{target}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{target}: not a directory")
    if st.st_dev != os.stat(directory).st_dev:
        raise UsageError(
            f"{target}: not on the filesystem of {directory}; imported files are renamed there"
        )


def _insert(conn: Connection, name: str, key: str, msg: SpoolMessage, st: os.stat_result) -> str:
    received_at = st.st_mtime
    queue_id = new_queue_id(received_at)
    row: dict[str, Any] = {
        "queue_id": queue_id,
        "state": states.RECEIVED,
        "received_at": received_at,
        "next_attempt_at": received_at,
        "client_addr": msg.client_addr,
        "client_name": msg.client_name,
        "protocol": "SMTP",
        "mail_from": msg.mail_from,
        "size": len(msg.body),
        "trace": msg.trace,
        "body": msg.body,
        "body_sha256": hashlib.sha256(msg.body).hexdigest(),
    }
    queries.insert_message(
        conn,
        row,
        msg.rcpts,
        [
            {
                "kind": "imported",
                "queue_id": queue_id,
                "client_addr": msg.client_addr,
                "detail": key,
            }
        ],
    )
    return queue_id


def spool_names(directory: str) -> list[str]:
    """Candidate names as smapd chose them: ``sma*``, not starting with a dot."""
    try:
        with os.scandir(directory) as it:
            return sorted(e.name for e in it if e.name.startswith("sma"))
    except OSError as exc:
        raise UsageError(f"{directory}: {exc.strerror}") from None


def import_spool(
    engine: Engine,
    directory: str,
    *,
    target_dir: str | None = None,
    dry_run: bool = False,
    batch: int = BATCH,
    report: Callable[[FileResult], None] = lambda r: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, int]:
    """Import every complete, unlocked ``sma*`` file of ``directory``; counts by outcome."""
    if not os.path.isdir(directory):
        raise UsageError(f"{directory}: not a directory")
    # One import per spool at a time: two runs reading the same file before either
    # commits would both import it.
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{directory}: another import-spool is running") from None
        return _import_locked(engine, directory, target_dir, dry_run, batch, report, progress)
    finally:
        os.close(lock)


def _import_locked(
    engine: Engine,
    directory: str,
    target_dir: str | None,
    dry_run: bool,
    batch: int,
    report: Callable[[FileResult], None],
    progress: Callable[[int, int], None],
) -> dict[str, int]:
    names = spool_names(directory)
    target = target_dir or os.path.join(directory, IMPORTED_DIR)
    if not dry_run:
        try:
            os.makedirs(target, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{target}: {exc.strerror}") from None
        _check_target(directory, target)
    elif os.path.exists(target):
        _check_target(directory, target)
    counts = dict.fromkeys((IMPORTED, ALREADY, INCOMPLETE, LOCKED, MALFORMED), 0)
    with engine.connect() as conn:
        done_keys = queries.imported_keys(conn)
    for start in range(0, len(names), batch):
        moved: list[FileResult] = []
        with engine.begin() as conn:
            for name in names[start : start + batch]:
                result = _one(conn, directory, name, done_keys, dry_run)
                counts[result.status] += 1
                if result.status in (IMPORTED, ALREADY):
                    moved.append(result)
                else:
                    report(result)
            if dry_run:
                conn.rollback()
        # Only after the commit: a crash before this leaves files whose key is recorded.
        for result in moved:
            if not dry_run:
                _move(directory, result.name, target)
            report(result)
        progress(min(start + batch, len(names)), len(names))
    return counts


def _one(
    conn: Connection, directory: str, name: str, done_keys: set[str], dry_run: bool
) -> FileResult:
    got = _read(directory, name)
    if isinstance(got, FileResult):
        return got
    data, st = got
    key = f"{name} sha256={hashlib.sha256(data).hexdigest()}"
    if key in done_keys:
        return FileResult(name, ALREADY, "moved aside")
    try:
        msg = parse(data)
    except Malformed as exc:
        return FileResult(name, MALFORMED, str(exc))
    notes = [f"{len(msg.rcpts)} recipient(s)"]
    if msg.dropped:
        notes.append(f"dropped recipient(s) starting with '-': {', '.join(msg.dropped)}")
    if not msg.trace:
        notes.append("no smap Received: line")
    queue_id = "(dry run)" if dry_run else _insert(conn, name, key, msg, st)
    done_keys.add(key)
    return FileResult(name, IMPORTED, "; ".join(notes), queue_id, alert=bool(msg.dropped))
