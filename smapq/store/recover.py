"""``smapq db recover``: copy what can be read of a damaged SQLite queue database.

Purpose: copy every message that can still be read into a fresh database (made by
the migrations, so its schema is current) and say what was saved and what was lost.
``verify.py`` says whether a file is damaged in the first place.

How recover reads: through SQLite itself, by id ranges of each table, walking the
table and not its indexes (which may be the damaged part); a range that fails is
halved until the unreadable rows stand alone. A message whose row is readable but
whose body is not is kept without its body, held, with the reason -- its envelope
(sender, recipients, client) is what the admin needs to ask for it again. A body
that no longer matches its checksum is kept, held, and said so. A message that was
``delivering`` goes back to ``received``. The envelope log is then cross-checked:
every queue id it shows accepted (or imported) and never delivered, bad, deleted or
purged, but that no longer has a row, is named as lost; so is every row the indexes
(on other pages) still name but the table no longer gives. Rows of a damaged page
are gone either way; SQLite's ``.recover`` could sometimes find more, but Debian's
sqlite3 program is built without the page access it needs (``no such table:
sqlite_dbpage``), so this does not depend on it.

Security: the damaged file is opened read-only (``mode=ro``) and never changed. The
output is created 0600 and must not exist yet; installing it is the admin's step
(docs/recovery.md), after smap and smapd are stopped, followed by ``smapq init``,
which gives it the owner and mode the table asks for.

SQLite only: a PostgreSQL queue has its server's tools (amcheck, pg_dump).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

from smapq.errors import UsageError
from smapq.store import states
from smapq.store.schema import events, messages, recipients
from smapq.store.verify import MAX_LISTED, only_sqlite, open_ro

CHUNKS = {"messages": 32, "recipients": 1024, "events": 1024}  # ids per range query
HELD_DAMAGED = "body damaged in the queue database (sha256 mismatch); recovered and held"
HELD_NO_BODY = "body unreadable in the damaged queue database; envelope recovered and held"
HELD_NO_RCPT = "recipients unreadable in the damaged queue database; recovered and held"


class Gone:
    """A message row that could not be read or has vanished, as the indexes know it."""

    __slots__ = ("fate", "mid", "qid", "rcpts", "sender", "what")

    def __init__(
        self, mid: int, qid: str | None, sender: str | None, rcpts: list[str], what: str
    ) -> None:
        self.mid = mid
        self.qid = qid
        self.sender = sender
        self.rcpts = rcpts
        self.what = what
        self.fate: str | None = None  # its final event in the log: delivered or bad

    def __str__(self) -> str:
        who = f"from <{self.sender}>" if self.sender is not None else "sender unknown"
        to = ", ".join(self.rcpts) if self.rcpts else "recipients unknown"
        qid = self.qid or "(queue id unknown)"
        return f"{qid} (message id {self.mid}) {who} to {to}: {self.what}"


class Recovery:
    """Counts of one recovery, and the queue ids known lost."""

    __slots__ = (
        "by_state",
        "damaged_bodies",
        "events",
        "lost",
        "missing",
        "no_body",
        "recipients",
        "unreadable",
        "unusable",
        "vanished",
    )

    def __init__(self) -> None:
        self.by_state: dict[str, int] = {}
        self.recipients = 0
        self.events = 0
        self.damaged_bodies = 0
        self.no_body = 0
        self.unreadable: dict[str, list[int]] = {"messages": [], "recipients": [], "events": []}
        self.unusable = 0  # rows read, but with values no message can have
        self.lost: list[str] = []
        self.vanished: list[Gone] = []
        self.missing: list[int] = []  # ids the indexes know and the table no longer shows

    @property
    def messages(self) -> int:
        return sum(self.by_state.values())

    @property
    def unaccounted(self) -> bool:
        """Mail that is lost: named by the log, or a row gone with no known fate."""
        return bool(self.lost) or any(not g.fate for g in self.vanished)

    def lines(self, out: str) -> list[str]:
        states_text = ", ".join(f"{s} {n}" for s, n in sorted(self.by_state.items()))
        lines = [f"recovered {self.messages} messages into {out} ({states_text or 'none'})"]
        lines.append(f"  {self.recipients} recipients, {self.events} events")
        held = []
        if self.damaged_bodies:
            held.append(f"{self.damaged_bodies} with a damaged body")
        if self.no_body:
            held.append(f"{self.no_body} whose body could not be read")
        if held:
            lines.append(
                f"  waiting messages held for you to look at: {', '.join(held)} "
                "(smapq queue list --state held)"
            )
        skipped = {t: ids for t, ids in self.unreadable.items() if ids}
        for table, ids in skipped.items():
            lines.append(f"  {len(ids)} {table} rows could not be read: ids {_ranges(ids)}")
        if self.unusable:
            lines.append(f"  {self.unusable} rows held impossible values and were left out")
        for g in [g for g in self.vanished if g.fate][:MAX_LISTED]:
            lines.append(f"  gone, but {g.fate} before (envelope log): {g}")
        for g in [g for g in self.vanished if not g.fate][:MAX_LISTED]:
            lines.append(f"  LOST: {g}")
        if self.lost:
            listed = " ".join(self.lost[:MAX_LISTED])
            listed += " ..." if len(self.lost) > MAX_LISTED else ""
            lines.append(f"  LOST: {len(self.lost)} messages in all: {listed}")
        elif self.unaccounted:
            lines.append("  LOST: the message rows above, their queue ids unknown")
        else:
            lines.append("  no message the envelope log shows accepted is missing")
        return lines


def recover(path: str, out: str, create_schema: Any) -> Recovery:
    """Copy what can be read of ``path`` into the new file ``out``.

    ``create_schema(out)`` makes the empty, migrated database (the caller owns the
    migrations); everything else happens here.
    """
    only_sqlite(path)
    if os.path.lexists(out):
        raise UsageError(f"{out} exists already; recover writes a new file only")
    if os.path.realpath(out) == os.path.realpath(path):
        raise UsageError("the output must be a new file, not the damaged one")
    result = Recovery()
    with closing(open_ro(path)) as src:
        old = os.umask(0o077)
        try:
            create_schema(out)
        finally:
            os.umask(old)
        try:
            with closing(sqlite3.connect(out, isolation_level=None)) as dst:
                dst.execute("PRAGMA foreign_keys = OFF")
                dst.execute("BEGIN")
                kept = _copy_messages(src, dst, result)
                _copy_recipients(src, dst, kept, result)
                _copy_events(src, dst, result)
                _hold_without_recipients(dst, result)
                indexes = _message_indexes(src)
                result.vanished = _identify(
                    src, indexes, result.unreadable["messages"], "its row cannot be read"
                )
                missing = _indexed_ids(src, indexes) - kept - set(result.unreadable["messages"])
                result.missing = sorted(missing)
                result.vanished += _identify(
                    src, indexes, result.missing, "its row is gone from the table"
                )
                _fates(dst, result.vanished)
                result.lost = _lost(dst, result.vanished)
                dst.execute("COMMIT")
        except BaseException:
            for suffix in ("", "-wal", "-shm", "-journal"):
                if os.path.exists(out + suffix):
                    os.unlink(out + suffix)
            raise
    os.chmod(out, 0o600)
    return result


def _rows(
    src: sqlite3.Connection, table: str, columns: Sequence[str], skipped: list[int]
) -> Iterator[tuple[Any, ...]]:
    """Every readable row of ``table``, by id ranges; unreadable ids go to ``skipped``."""
    cols = ", ".join(columns)
    sql = f"SELECT {cols} FROM {table} NOT INDEXED WHERE id BETWEEN ? AND ? ORDER BY id"
    chunk = CHUNKS[table]
    try:
        low, high = src.execute(f"SELECT min(id), max(id) FROM {table}").fetchone()
    except sqlite3.DatabaseError:  # the edges of the table are damaged: halve from all
        ranges = [(1, 2**53)]
    else:
        if low is None:
            return
        ranges = [(a, min(a + chunk - 1, high)) for a in range(low, high + 1, chunk)]
        ranges.reverse()
    while ranges:
        a, b = ranges.pop()
        try:
            got = src.execute(sql, (a, b)).fetchall()
        except sqlite3.DatabaseError:
            if a >= b:
                skipped.append(a)
            else:
                mid = (a + b) // 2
                ranges += [(mid + 1, b), (a, mid)]
            continue
        yield from got


MESSAGE_COLUMNS = [c.name for c in messages.columns]
_BODY = MESSAGE_COLUMNS.index("body")


def _copy_messages(src: sqlite3.Connection, dst: sqlite3.Connection, result: Recovery) -> set[int]:
    skipped: list[int] = []
    kept: set[int] = set()
    seen_qids: set[str] = set()
    insert = (
        f"INSERT INTO messages ({', '.join(MESSAGE_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(MESSAGE_COLUMNS))})"
    )
    for row in _rows(src, "messages", MESSAGE_COLUMNS, skipped):
        values = _message(dict(zip(MESSAGE_COLUMNS, row, strict=True)), result)
        if values is None or values["queue_id"] in seen_qids:
            result.unusable += 1
            continue
        seen_qids.add(values["queue_id"])
        dst.execute(insert, [values[c] for c in MESSAGE_COLUMNS])
        kept.add(values["id"])
    # A row whose body sits on a damaged page: take the envelope without it.
    without_body = [c for c in MESSAGE_COLUMNS if c != "body"]
    for mid in skipped:
        try:
            row = src.execute(
                f"SELECT {', '.join(without_body)} FROM messages NOT INDEXED WHERE id = ?",
                (mid,),
            ).fetchone()
        except sqlite3.DatabaseError:
            result.unreadable["messages"].append(mid)
            continue
        if row is None:
            continue
        fields = dict(zip(without_body, row, strict=True))
        fields["body"] = None
        values = _message(fields, result, body_lost=True)
        if values is None or values["queue_id"] in seen_qids:
            result.unusable += 1
            continue
        seen_qids.add(values["queue_id"])
        dst.execute(insert, [values[c] for c in MESSAGE_COLUMNS])
        kept.add(values["id"])
    return kept


def _message(
    f: dict[str, Any], result: Recovery, body_lost: bool = False
) -> dict[str, Any] | None:
    """A row fit for the fresh database, or None if its values cannot be a message."""
    try:
        f["id"] = int(f["id"])
        for name in ("queue_id", "protocol", "mail_from", "trace", "body_sha256"):
            if not isinstance(f[name], str):
                return None
        if not f["queue_id"] or f["state"] not in states.STATES:
            return None
        for name in ("received_at", "next_attempt_at", "updated_at"):
            f[name] = float(f[name])
        f["size"], f["attempts"] = int(f["size"]), max(0, int(f["attempts"] or 0))
        f["lease_token"] = int(f["lease_token"] or 0)
    except (TypeError, ValueError):
        return None
    if f["body"] is not None and not isinstance(f["body"], bytes):
        return None
    if f["state"] == states.DELIVERING:  # nobody holds it any more
        f["state"] = states.RECEIVED
        f["lease_owner"] = f["lease_expires_at"] = None
    # Only waiting mail is held for a damaged or lost body: delivered and bad mail has
    # had its fate, and keeps it.
    if f["state"] in states.WAITING:
        if body_lost:
            result.no_body += 1
            f["state"], f["last_result"] = states.HELD, HELD_NO_BODY
        elif f["body"] is not None and hashlib.sha256(f["body"]).hexdigest() != f["body_sha256"]:
            result.damaged_bodies += 1
            f["state"], f["last_result"] = states.HELD, HELD_DAMAGED
    result.by_state[f["state"]] = result.by_state.get(f["state"], 0) + 1
    return f


def _copy_recipients(
    src: sqlite3.Connection, dst: sqlite3.Connection, kept: set[int], result: Recovery
) -> None:
    cols = [c.name for c in recipients.columns]
    insert = f"INSERT INTO recipients ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    seen: set[tuple[int, int]] = set()
    for row in _rows(src, "recipients", cols, result.unreadable["recipients"]):
        f = dict(zip(cols, row, strict=True))
        try:
            key = (int(f["message_id"]), int(f["position"]))
        except (TypeError, ValueError):
            result.unusable += 1
            continue
        if key[0] not in kept or key in seen or not isinstance(f["address"], str):
            result.unusable += key[0] in kept
            continue
        seen.add(key)
        dst.execute(insert, [f[c] for c in cols])
        result.recipients += 1


def _copy_events(src: sqlite3.Connection, dst: sqlite3.Connection, result: Recovery) -> None:
    cols = [c.name for c in events.columns]
    insert = f"INSERT INTO events ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    for row in _rows(src, "events", cols, result.unreadable["events"]):
        f = dict(zip(cols, row, strict=True))
        if not isinstance(f["kind"], str) or not isinstance(f["at"], int | float):
            result.unusable += 1
            continue
        dst.execute(insert, [f[c] for c in cols])
        result.events += 1


def _hold_without_recipients(dst: sqlite3.Connection, result: Recovery) -> None:
    """A waiting message whose recipients were all lost cannot be delivered: hold it."""
    waiting = ", ".join(f"'{s}'" for s in states.WAITING if s != states.HELD)
    rows = dst.execute(
        f"SELECT id, state FROM messages WHERE state IN ({waiting}) AND NOT EXISTS "
        "(SELECT 1 FROM recipients r WHERE r.message_id = messages.id)"
    ).fetchall()
    for mid, state in rows:
        dst.execute(
            "UPDATE messages SET state = ?, last_result = ? WHERE id = ?",
            (states.HELD, HELD_NO_RCPT, mid),
        )
        result.by_state[state] -= 1
        result.by_state[states.HELD] = result.by_state.get(states.HELD, 0) + 1


def _message_indexes(src: sqlite3.Connection) -> list[str]:
    try:
        return [
            str(r[0])
            for r in src.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
            )
        ]
    except sqlite3.DatabaseError:
        return []


def _indexed_ids(src: sqlite3.Connection, indexes: list[str]) -> set[int]:
    """Message ids the indexes (and the recipients) still name, read without the table.

    A damaged page can also make rows vanish without an error; their index entries,
    on other pages, still name them.
    """
    found: set[int] = set()
    queries = [f'SELECT id FROM messages INDEXED BY "{name}"' for name in indexes]
    queries.append("SELECT DISTINCT message_id FROM recipients")
    for sql in queries:
        try:
            for (mid,) in src.execute(sql):
                if isinstance(mid, int):
                    found.add(mid)
        except sqlite3.DatabaseError:
            continue  # what it read so far counts
    return found


def _identify(
    src: sqlite3.Connection, indexes: list[str], ids: list[int], what: str
) -> list[Gone]:
    """What the indexes still know of message rows that cannot be read.

    The table row is gone, but index entries live on other pages: the unique index on
    queue_id and the sender index each hold the row's id, and the recipients are rows
    of their own. Enough to name the message and ask its sender to send it again.
    """
    unique = next((n for n in indexes if n.startswith("sqlite_autoindex_messages")), None)
    by_sender = "ix_messages_mail_from" if "ix_messages_mail_from" in indexes else None
    out = []
    for mid in ids:
        try:
            rcpts = [
                str(r[0])
                for r in src.execute(
                    "SELECT address FROM recipients WHERE message_id = ? ORDER BY position",
                    (mid,),
                )
            ]
        except sqlite3.DatabaseError:
            rcpts = []
        qid = _via_index(src, unique, "queue_id", mid)
        sender = _via_index(src, by_sender, "mail_from", mid)
        out.append(Gone(mid, qid, sender, rcpts, what))
    return out


def _fates(dst: sqlite3.Connection, vanished: list[Gone]) -> None:
    """Note which vanished rows the recovered envelope log shows delivered or bad: the
    damage came after their fate, so they are not lost mail."""
    for g in vanished:
        if g.qid is None:
            continue
        row = dst.execute(
            "SELECT kind FROM events WHERE queue_id = ? AND kind IN ('delivered', 'bad') "
            "ORDER BY id DESC LIMIT 1",
            (g.qid,),
        ).fetchone()
        g.fate = None if row is None else str(row[0])


def _via_index(src: sqlite3.Connection, index: str | None, column: str, mid: int) -> str | None:
    if index is None:
        return None
    try:
        row = src.execute(
            f'SELECT {column} FROM messages INDEXED BY "{index}" WHERE id = ?', (mid,)
        ).fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None or row[0] is None else str(row[0])


def _lost(dst: sqlite3.Connection, vanished: list[Gone]) -> list[str]:
    """Queue ids the envelope log shows accepted, never deleted, purged, delivered or
    bad, without a row -- and those of unreadable rows the indexes still name."""
    known = [g.qid for g in vanished if g.qid is not None and not g.fate]
    rows = dst.execute(
        "SELECT DISTINCT e.queue_id FROM events e WHERE e.kind IN ('accept', 'imported') "
        "AND e.queue_id IS NOT NULL "
        "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.queue_id = e.queue_id) "
        "AND NOT EXISTS (SELECT 1 FROM events g WHERE g.queue_id = e.queue_id "
        "AND g.kind IN ('deleted', 'purged', 'delivered', 'bad')) ORDER BY e.queue_id"
    ).fetchall()
    return sorted({str(r[0]) for r in rows} | set(known))


def _ranges(ids: list[int]) -> str:
    """1 2 3 7 -> '1-3 7' (at most MAX_LISTED pieces)."""
    ids = sorted(set(ids))
    parts: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return " ".join(parts[:MAX_LISTED]) + (" ..." if len(parts) > MAX_LISTED else "")
