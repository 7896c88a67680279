"""A note beside the queue database that it was found damaged.

Purpose: the deliverer meets a damaged page (SQLITE_CORRUPT) long before anyone reads
a report. It leaves ``<database>.damaged`` (when, what, who) so that reports refuse
to print numbers from a file known to be damaged, ``check-config`` lists it as a
problem, and the admin knows to run ``smapq db verify``; a clean verify or a
recovered database removes it. Only for database files (a server URL has no file).

Security: the note is text for people, never parsed beyond its first line; it is
created 0600 by whoever found the damage, like the database's other files.
"""

from __future__ import annotations

import contextlib
import os
import time

SUFFIX = ".damaged"


def path_of(database: str) -> str | None:
    return None if "://" in database else database + SUFFIX


def mark(database: str, detail: str, who: str) -> None:
    """Record the damage (best effort: a full or read-only disk must not stop us)."""
    path = path_of(database)
    if path is None or os.path.exists(path):
        return
    detail = " ".join(detail.split())
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} {who}: {detail}\n"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
            if os.geteuid() == 0:  # an admin command: the note belongs to the queue's owner
                st = os.stat(database)
                os.fchown(fd, st.st_uid, st.st_gid)
        finally:
            os.close(fd)


def note(database: str) -> str | None:
    """The first line of the note, or None when the database is not known damaged."""
    path = path_of(database)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().strip() or "(no detail)"
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"(unreadable note: {exc.strerror})"


def clear(database: str) -> bool:
    path = path_of(database)
    if path is None:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
