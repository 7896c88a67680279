"""``smapq db verify``: is the SQLite queue file sound?

Purpose: one answer for an admin who suspects damage (or runs it from cron): SQLite's
``integrity_check`` (every page, every index against its table), the foreign keys,
the schema revision, and every stored body against the sha256 intake stored beside
it. A clean verify removes the ``.damaged`` note (store/damage.py); problems are
returned one line each.

Security: opens the file read-only (``mode=ro``) and changes nothing in it.

SQLite only: a PostgreSQL queue has its server's tools (amcheck). The helpers here
(read-only open, the SQLite-only check) are shared with recover.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from contextlib import closing

from smapq.errors import SmapqError, UsageError
from smapq.store import damage

MAX_LISTED = 20  # problems or lost ids named one by one
QUICK_MAX_BYTES = 32 * 1024 * 1024  # reports check files up to this size themselves


def open_ro(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise SmapqError(f"queue database {path} does not exist")
    uri = "file:" + path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    return sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None)


def only_sqlite(database: str) -> None:
    if "://" in database and not database.startswith("sqlite"):
        raise UsageError(
            "db verify and db recover work on SQLite queue files; for a database server "
            "use its own tools (PostgreSQL: amcheck, pg_dump)"
        )


class Verdict:
    """What ``verify`` found: problems (empty when sound) and what it checked."""

    __slots__ = ("bodies", "problems")

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.bodies = 0


def verify(path: str, head: str) -> Verdict:
    """Check the file at ``path``; ``head`` is the schema revision it must be at."""
    only_sqlite(path)
    found = Verdict()
    try:
        with closing(open_ro(path)) as db:
            _check_pages(db, found)
            _check_keys(db, found)
            _check_schema(db, head, found)
            _check_bodies(db, found)
    except sqlite3.DatabaseError as exc:
        found.problems.append(f"cannot be read: {exc}")
    if not found.problems:
        damage.clear(path)
    return found


def _check_pages(db: sqlite3.Connection, found: Verdict) -> None:
    rows = db.execute(f"PRAGMA integrity_check({MAX_LISTED})").fetchall()
    found.problems += [_one_line(str(r[0])) for r in rows if r[0] != "ok"]


def _check_keys(db: sqlite3.Connection, found: Verdict) -> None:
    orphans = db.execute("PRAGMA foreign_key_check").fetchall()
    if orphans:
        found.problems.append(f"{len(orphans)} rows refer to rows that do not exist")


def _check_schema(db: sqlite3.Connection, head: str, found: Verdict) -> None:
    try:
        rows = db.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.OperationalError as exc:
        found.problems.append(f"no schema revision: {exc}")
        return
    current = rows[0][0] if rows else None
    if current != head:
        found.problems.append(f"schema is at {current or 'nothing'}, not {head}")


def _check_bodies(db: sqlite3.Connection, found: Verdict) -> None:
    bad: list[str] = []
    cur = db.execute(
        "SELECT queue_id, body, body_sha256 FROM messages WHERE body IS NOT NULL ORDER BY id"
    )
    for qid, body, digest in cur:
        found.bodies += 1
        if hashlib.sha256(body).hexdigest() != digest:
            bad.append(str(qid))
    if bad:
        listed = " ".join(bad[:MAX_LISTED]) + (" ..." if len(bad) > MAX_LISTED else "")
        found.problems.append(f"{len(bad)} bodies do not match their sha256: {listed}")


def quick(path: str) -> str | None:
    """For reports: SQLite's ``quick_check`` of a file up to QUICK_MAX_BYTES (tens of
    milliseconds), so a small damaged queue is never reported on silently; the first
    problem, or None (also for larger files: the deliverer's note and ``db verify``
    from cron cover those)."""
    try:
        size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    except OSError:
        return None
    if size > QUICK_MAX_BYTES:
        return None
    try:
        with closing(open_ro(path)) as db:
            first = db.execute("PRAGMA quick_check(1)").fetchone()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None if first is None or first[0] == "ok" else _one_line(str(first[0]))


def _one_line(text: str) -> str:
    """SQLite puts "*** in database main ***" on a line of its own before a problem."""
    return "; ".join(p.strip() for p in text.replace("*** in database main ***", "").splitlines()
                     if p.strip()) or text.strip()  # fmt: skip
