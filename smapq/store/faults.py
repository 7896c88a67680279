"""Database errors sorted by what to do about them, whatever the backend.

Purpose: the deliverer and the admin verbs choose between waiting, making room,
skipping one row and stopping from the kind of a DBAPI error, never from its text.
SQLite result codes and PostgreSQL SQLSTATEs map to the same few kinds here, so no
caller knows a dialect.

Kinds: FULL (no space: SQLITE_FULL, 53100 disk_full), DAMAGED (the file or an index
is corrupt: SQLITE_CORRUPT, SQLITE_NOTADB, XX001/XX002), BUSY (locked past the busy
timeout, a serialization failure or deadlock: retry), READONLY (the database or its
-wal/-shm cannot be written by this uid: an owner or mode problem, see ``smapq
check-config``), OTHER.
"""

from __future__ import annotations

FULL = "full"
DAMAGED = "damaged"
BUSY = "busy"
READONLY = "read-only"
OTHER = "error"

_SQLITE = {13: FULL, 11: DAMAGED, 26: DAMAGED, 5: BUSY, 6: BUSY, 8: READONLY}
_SQLSTATE = {
    "53100": FULL,
    "XX001": DAMAGED,
    "XX002": DAMAGED,
    "40001": BUSY,
    "40P01": BUSY,
    "55P03": BUSY,
    "25006": READONLY,
    "42501": READONLY,
}

WHAT = {
    FULL: "queue database or disk is full",
    DAMAGED: "queue database is damaged",
    BUSY: "queue database is busy",
    READONLY: "queue database cannot be written",
    OTHER: "queue database error",
}


def kind(exc: BaseException) -> str:
    """The kind of a DBAPIError (or of the driver error it wraps)."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _SQLITE.get(code & 0xFF, OTHER)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str):
        return _SQLSTATE.get(state, OTHER)
    return OTHER


def reason(exc: BaseException) -> str:
    """The driver's message, first line only."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__


def describe(exc: BaseException) -> str:
    """One line for logs and error messages: what it means, then the driver's words."""
    what, why = WHAT[kind(exc)], reason(exc)
    return what if why in what else f"{what}: {why}"
