"""``smapq queue …``: list, show and export messages; requeue, hold, release, delete, purge.

Purpose: postqueue/postsuper for a database spool. Every change is one transaction
(SQLite ``BEGIN IMMEDIATE``) that moves the rows and appends one event per message
(requeued, held, released, deleted, purged, exported) naming who did it.

Safety against in-flight delivery: a ``delivering`` row belongs to a deliverer until
its lease expires. ``hold`` and ``delete`` skip such a row and say so (run them again
once the attempt finished); a row whose lease already expired is fair game -- a late
deliverer's outcome is fenced by ``lease_token`` and will change nothing. Each UPDATE
or DELETE re-checks the state inside the statement, so a claim that commits between
our read and our write wins and the row is reported as skipped, never clobbered.

Bad input (an unknown queue id) is found before anything is written: the whole
command fails with one line and nothing changes.

The baddir copies (``<queue_id>.eml`` and ``.envelope``, written by the deliverer when a
message goes bad) are FWTK's bad directory: a message that leaves state bad (requeue,
hold) or the database (delete, purge) takes them with it, after its transaction
committed. A copy that cannot be removed is reported, never fatal.

A message in state received that was tried before is shown as ``deferred``, as in
``smapq report deferred`` and Postfix's deferred queue.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Engine

from smapq.errors import SmapqError, UsageError
from smapq.report import timespec
from smapq.report.output import Column, Report
from smapq.store import queries, states

DEFAULT_PAGE = 100
PURGE_BATCH = 1000
HEADERS_MAX = 200


def actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# smapq.deliver.baddir.export writes these two files per bad message.
BADDIR_SUFFIXES = (".eml", ".envelope")


def baddir_copies(directory: str | None, queue_id: str) -> list[str]:
    """The baddir files of one message that exist now."""
    if not directory or "/" in queue_id or queue_id.startswith("."):
        return []
    paths = [os.path.join(directory, queue_id + sfx) for sfx in BADDIR_SUFFIXES]
    return [p for p in paths if os.path.lexists(p)]


def remove_baddir_copies(directory: str | None, queue_id: str) -> str:
    """Remove them; returns what to tell the operator ('' when there were none)."""
    removed, failed = 0, []
    for path in baddir_copies(directory, queue_id):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror}")
    if failed:
        return "baddir copy left: " + "; ".join(failed)
    return f"{removed} baddir file(s) removed" if removed else ""


def shown_state(state: str, attempts: int) -> str:
    """``deferred`` for received mail that was tried before, else the state."""
    return "deferred" if state == states.RECEIVED and attempts > 0 else state


def like(glob: str) -> str:
    """A shell-style ``*``/``?`` pattern as a LIKE pattern (exact when it has neither)."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


# --- list ---------------------------------------------------------------------------


LIST_STATES = (*states.STATES, queries.DEFERRED)
RECIPIENT_CHUNK = 200


def list_messages(
    conn: Connection,
    now: float,
    *,
    queue_states: Sequence[str] = (),
    all_states: bool = False,
    sender: str | None = None,
    recipient: str | None = None,
    client: str | None = None,
    older_than: float | None = None,
    newer_than: float | None = None,
    after: str | None = None,
    limit: int | None = DEFAULT_PAGE,
) -> Report:
    """Messages in queue order, one page of ``limit`` (None: all), streamed.

    Like ``postqueue -p``: without ``queue_states`` only mail still waiting (received,
    deferred, delivering, held); ``all_states`` lists every message.
    """
    for s in queue_states:
        if s not in LIST_STATES:
            raise UsageError(f"--state: {s!r} is not one of {', '.join(LIST_STATES)}")
    if all_states and queue_states:
        raise UsageError("--all and --state exclude each other")
    chosen = tuple(queue_states) or (() if all_states else states.WAITING)
    after_id = 0
    if after:
        found = queries.queue_find(conn, [after])
        if after not in found:
            raise UsageError(f"--after: no message with queue id {after}")
        after_id = int(found[after].id)
    columns = [
        Column("queue_id", title="QUEUE_ID"),
        Column("state"),
        Column("received_at", "time", table=False),
        Column("age", "duration"),
        Column("size", "bytes"),
        Column("attempts", "int", "ATT"),
        Column("recipients", "int", "RCPT"),
        Column("sender", flex=True),
        Column("first_recipient", table=False),
        Column("client_addr", table=False),
        Column("status"),
        Column("next_attempt_at", "time", table=False),
        Column("last_result", flex=True),
        Column("pending_recipients", "list", table=False),
    ]
    report = Report("queue-list", columns, (), generated_at=now)
    report.extra["states"] = list(chosen) or list(states.STATES)
    rows = queries.queue_list(
        conn,
        queue_states=chosen,
        sender=like(sender) if sender is not None else None,
        recipient=like(recipient) if recipient is not None else None,
        client=like(client) if client is not None else None,
        received_before=None if older_than is None else now - older_than,
        received_after=None if newer_than is None else now - newer_than,
        after_id=after_id,
        limit=None if limit is None else limit + 1,
    )
    report.rows = _list_rows(conn, report, rows, now, limit)
    return report


def _list_rows(
    conn: Connection, report: Report, rows: Iterable[Any], now: float, limit: int | None
) -> Iterator[tuple[Any, ...]]:
    last = None
    n = 0
    for chunk in _chunked(rows, RECIPIENT_CHUNK):
        # One query per chunk of messages for their recipients, not one per message.
        rcpts = queries.queue_list_recipients(conn, [int(r[0]) for r in chunk])
        for mid, qid, state, rcv, size, att, frm, client, nr, first, due, result in chunk:
            if limit is not None and n >= limit:
                report.more = True
                report.extra["next_after"] = last
                report.notes.append(f"page full: continue with --after {last}")
                return
            n += 1
            last = qid
            pending = [a for a, sent in rcpts.get(int(mid), []) if sent is None]
            status = shown_state(state, int(att or 0))
            yield (
                qid,
                state,
                rcv,
                now - rcv,
                size,
                att,
                nr,
                frm or "<>",
                first,
                client,
                status,
                due if state == states.RECEIVED else None,
                result,
                pending,
            )
    report.extra.setdefault("next_after", None)


def _chunked(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- show and export ----------------------------------------------------------------


def _find_one(conn: Connection, queue_id: str) -> Any:
    row = queries.message_by_queue_id(conn, queue_id)
    if row is None:
        raise UsageError(f"no message with queue id {queue_id}")
    return row


def headers_of(body: bytes | None) -> list[tuple[str, str]]:
    """The header section of a message (unfolded), at most HEADERS_MAX fields."""
    if not body:
        return []
    out: list[tuple[str, str]] = []
    for raw in body.split(b"\n"):
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            break
        if line[0] in " \t" and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif ":" in line:
            if len(out) >= HEADERS_MAX:
                break
            name, _, value = line.partition(":")
            out.append((name.strip(), value.strip()))
        else:
            break  # not a header: the body starts without a blank line
    return out


def show(conn: Connection, queue_id: str) -> dict[str, Any]:
    """Envelope, recipients, the events timeline and the headers of one message."""
    m = _find_one(conn, queue_id)
    iso = timespec.iso
    envelope = {
        k: (iso(v) if k.endswith("_at") and k != "lease_expires_at" and v is not None else v)
        for k, v in m._mapping.items()
        if k not in ("body", "id")
    }
    envelope["lease_expires_at"] = iso(m.lease_expires_at)
    envelope["body_stored"] = m.body is not None
    envelope["recipients"] = [
        {
            "position": r.position,
            "address": r.address,
            "sent_at": iso(r.sent_at),
            "last_result": r.last_result,
        }
        for r in queries.recipients_of(conn, m.id)
    ]
    envelope["events"] = [
        {
            "at": iso(e.at),
            "kind": e.kind,
            "queue_id": e.queue_id,
            "session_id": e.session_id,
            "client_addr": e.client_addr,
            "address": e.address,
            "code": e.code,
            "detail": e.detail,
        }
        for e in queries.message_timeline(conn, queue_id, m.session_id)
    ]
    envelope["headers"] = [{"name": n, "value": v} for n, v in headers_of(m.body)]
    return envelope


def eml(trace: str, body: bytes) -> bytes:
    """The message as the deliverer hands it to sendmail: the trace header, then the body."""
    return trace.encode("utf-8", "surrogateescape") + body


def export(engine: Engine, queue_id: str, destination: str, now: float) -> bytes:
    """The .eml bytes of one message; records an 'exported' event saying where to."""
    with engine.begin() as conn:
        m = _find_one(conn, queue_id)
        stored = queries.message_body(conn, m.id)
        if stored is None or stored[1] is None:
            raise SmapqError(f"{queue_id}: body was purged; nothing to export")
        data = eml(stored[0], stored[1])
        queries.add_event(
            conn, "exported", at=now, queue_id=queue_id, detail=f"to {destination} by {actor()}"
        )
    return data


# --- state changes ------------------------------------------------------------------


class Outcome:
    """What a verb did to one message."""

    __slots__ = ("after", "before", "queue_id", "reason")

    def __init__(self, queue_id: str, before: str, after: str | None, reason: str = "") -> None:
        self.queue_id = queue_id
        self.before = before
        self.after = after
        self.reason = reason

    @property
    def changed(self) -> bool:
        return self.after is not None

    def line(self, dry_run: bool) -> str:
        if self.after is None:
            return f"{self.queue_id}: unchanged ({self.before}): {self.reason}"
        verb = "would go" if dry_run else ""
        # A received message never tried yet stays received; it is only made due now.
        arrow = (
            f"{self.before} -> {self.after}"
            if self.before != self.after
            else f"{self.after}, due now"
        )
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.queue_id}: {verb + ' ' if verb else ''}{arrow}{why}"

    def add_reason(self, text: str) -> None:
        if text:
            self.reason = f"{self.reason}; {text}" if self.reason else text


# verb -> (event kind, states it applies to, target state, due now)
VERBS: dict[str, tuple[str, tuple[str, ...], str, bool]] = {
    "requeue": ("requeued", (states.RECEIVED, states.BAD, states.HELD), states.RECEIVED, True),
    "hold": ("held", (states.RECEIVED, states.BAD), states.HELD, False),
    "release": ("released", (states.HELD,), states.RECEIVED, True),
    "delete": ("deleted", tuple(states.STATES), "deleted", False),
}


def _live_lease(row: Any, now: float) -> bool:
    return bool(row.state == states.DELIVERING and (row.lease_expires_at or 0) >= now)


def _why_not(verb: str, row: Any, now: float) -> str:
    if row.state == states.DELIVERING:
        until = timespec.iso(row.lease_expires_at)
        if _live_lease(row, now):
            return f"in delivery (lease until {until}); try again when the attempt is over"
        # Only the deliverer's recovery may take it back: requeueing it here could start
        # a second delivery while the first sendmail still runs.
        return (
            f"in delivery, lease expired at {until}; the next deliverer run takes it back"
            " to received (delete works now)"
        )
    if verb == "release":
        return "not held"
    if row.state == states.DELIVERED:
        return "already delivered"
    return f"already {row.state}"


def change(
    engine: Engine,
    verb: str,
    queue_ids: Sequence[str],
    now: float,
    *,
    all_bad: bool = False,
    dry_run: bool = False,
    baddir: str | None = None,
) -> list[Outcome]:
    """Apply ``verb`` to the messages; all ids must exist or nothing changes.

    ``baddir``: ``smapd: baddir``, whose copies of a message leaving state bad (or
    deleted) are removed once the change committed.
    """
    kind, from_states, target, due_now = VERBS[verb]
    if not queue_ids and not all_bad:
        raise UsageError(f"{verb}: name at least one queue id")
    who = actor()
    outcomes: list[Outcome] = []
    with engine.begin() as conn:
        ids = list(dict.fromkeys(queue_ids))
        if all_bad:
            ids += [q for q in queries.queue_ids_in_state(conn, states.BAD) if q not in ids]
        found = queries.queue_find(conn, ids)
        unknown = [q for q in ids if q not in found]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise UsageError(f"no message with queue id {unknown[0]}{more}; nothing changed")
        for qid in ids:
            row = found[qid]
            before = shown_state(row.state, int(row.attempts or 0))
            allowed = not _live_lease(row, now) if verb == "delete" else row.state in from_states
            if not allowed:
                outcomes.append(Outcome(qid, before, None, _why_not(verb, row, now)))
                continue
            if not dry_run:
                if verb == "delete":
                    done = queries.queue_delete(conn, row.id, now)
                else:
                    done = queries.queue_transition(
                        conn, row.id, [row.state], target, now, due_now
                    )
                if not done:
                    outcomes.append(Outcome(qid, before, None, "changed meanwhile; retry"))
                    continue
                queries.add_event(
                    conn, kind, at=now, queue_id=qid, detail=f"{before} -> {target} by {who}"
                )
            note = ""
            if row.state == states.DELIVERING:
                note = "its lease had expired: a late outcome of that attempt is discarded"
            outcomes.append(Outcome(qid, before, target, note))
    for o in outcomes:
        if o.changed and (verb == "delete" or o.before == states.BAD):
            if dry_run:
                n = len(baddir_copies(baddir, o.queue_id))
                o.add_reason(f"would remove {n} baddir file(s)" if n else "")
            else:
                o.add_reason(remove_baddir_copies(baddir, o.queue_id))
    return outcomes


# --- purge (retention) --------------------------------------------------------------


class PurgeResult:
    __slots__ = ("baddir_left", "baddir_removed", "bodies", "messages", "rows")

    def __init__(self) -> None:
        self.messages = 0
        self.bodies = 0
        self.rows = 0
        self.baddir_removed = 0
        self.baddir_left: list[str] = []


def purge(
    engine: Engine,
    cutoff: float,
    now: float,
    *,
    include_bad: bool = False,
    keep_rows: bool = False,
    dry_run: bool = False,
    batch: int = PURGE_BATCH,
    progress: Callable[[PurgeResult], None] | None = None,
    baddir: str | None = None,
) -> PurgeResult:
    """Retention: bodies of final mail older than cutoff, then (unless keep_rows) rows.

    Works in batches of ``batch`` messages, one transaction each, so receivers and
    deliverers are never locked out for long. Events stay: the envelope log outlives
    the messages it describes. Each purged message gets a 'purged' event. Bad mail
    whose row goes also loses its copies in ``baddir``.
    """
    result = PurgeResult()
    who = actor()
    chosen = [states.DELIVERED, states.BAD] if include_bad else [states.DELIVERED]
    for state in chosen:
        after = (-1.0, 0)
        while True:
            with engine.begin() as conn:
                rows = queries.purge_candidates(
                    conn, state, cutoff, after, batch, with_body_only=keep_rows
                )
                if not rows:
                    break
                after = (float(rows[-1].final_at), int(rows[-1].id))
                ids = [int(r.id) for r in rows]
                with_body = sum(1 for r in rows if r.has_body)
                if dry_run:
                    result.messages += len(rows)
                    result.bodies += with_body
                    result.rows += 0 if keep_rows else len(rows)
                    conn.rollback()
                    if progress is not None:
                        progress(result)
                    continue
                # Each write re-checks the state: a message requeued meanwhile is skipped.
                done = set(queries.purge_bodies(conn, ids, state))
                result.bodies += len(done)
                what = "body"
                gone: list[str] = []
                if not keep_rows:
                    gone = queries.purge_rows(conn, ids, state)
                    result.rows += len(gone)
                    done.update(gone)
                    what = "body and row"
                result.messages += len(done)
                queries.insert_events(
                    conn,
                    [
                        {
                            "at": now,
                            "kind": "purged",
                            "queue_id": r.queue_id,
                            "detail": f"{state} {what} older than {timespec.iso(cutoff)} by {who}",
                        }
                        for r in rows
                        if r.queue_id in done
                    ],
                )
            for qid in gone if state == states.BAD else []:
                said = remove_baddir_copies(baddir, qid)
                if said.startswith("baddir copy left"):
                    result.baddir_left.append(f"{qid}: {said}")
                elif said:
                    result.baddir_removed += 1
            if progress is not None:
                progress(result)
    return result
