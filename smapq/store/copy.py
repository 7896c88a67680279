"""Moving a site: copy a SQLite queue into a PostgreSQL database (``smapq db copy``).

Purpose: every row of messages, recipients and events -- waiting, held, deferred,
bad and delivered mail, recipients with their sent state, the envelope log -- with
every column as it is (ids, float timestamps and bodies byte for byte), then the
id sequences set past the copied ids so new mail never reuses one. Mail that was
being delivered (state ``delivering``) has its lease released as a deliverer's
recovery would: ``received``, the attempt counted, due now, and a ``recovered``
event that says so. Counts per table are compared at the end.

Crash safety: the source is read in one SQLite read transaction, a snapshot, and
only read. The target is written in transactions of at most ``chunk`` messages
(or CHUNK_BYTES of bodies) with all their recipients, then events in chunks, in id
order, so after a kill -9 the target holds a prefix of the source. A re-run sees
that (every copied message's id, queue id and arrival time match the source's) and
goes on after the last committed id; a re-run of a finished copy copies nothing and
compares the counts again. A target with other rows is refused.

Security: runs as the admin; the target URL names a role that owns (or may write)
the tables -- ``smapq db grant`` roles are for running, not for moving. Stop the
receivers and the deliverers first: mail accepted after the snapshot is not
copied, and a resumed copy refuses a source whose copied rows changed.

Standards: PostgreSQL COPY FROM STDIN (text format, psycopg 3 adapts the values).

Diagnostics: ``CopyError`` with one line; PostgreSQL's own reason for its errors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, Table, func, select

from smapq.errors import SmapqError
from smapq.store import migrate, states
from smapq.store.schema import events, messages, recipients

CHUNK_ROWS = 500
CHUNK_BYTES = 32 << 20
RECOVERED_DETAIL = "lease released by smapq db copy"

Progress = Callable[[str, bool], None]


class CopyError(SmapqError):
    """The copy cannot start or cannot go on; nothing already committed is lost."""


@dataclass
class TableCount:
    table: str
    source: int
    copied: int = 0  # by this run
    target: int = 0
    expected: int = 0  # what the target must hold: the source's, plus copy's events


@dataclass
class CopyResult:
    counts: list[TableCount]
    resumed: bool = False
    released: int = 0  # leases of delivering mail released by this run
    schema_made: str | None = None
    notes: list[str] = field(default_factory=list)

    def mismatches(self) -> list[TableCount]:
        return [c for c in self.counts if c.target != c.expected]


def _columns(table: Table) -> list[str]:
    return [c.name for c in table.columns]


def _copy_sql(table: Table) -> str:
    return f"COPY {table.name} ({', '.join(_columns(table))}) FROM STDIN"


def _target_scalar(pg: psycopg.Connection[Any], sql: str) -> Any:
    row = pg.execute(sql).fetchone()
    assert row is not None
    return row[0]


def _counts(pg: psycopg.Connection[Any]) -> dict[str, int]:
    return {
        t.name: int(_target_scalar(pg, f"SELECT count(*) FROM {t.name}"))
        for t in (messages, recipients, events)
    }


def _max_id(pg: psycopg.Connection[Any], table: Table) -> int:
    return int(_target_scalar(pg, f"SELECT coalesce(max(id), 0) FROM {table.name}"))


def _released(row: Sequence[Any], names: list[str], now: float) -> tuple[Any, ...]:
    """A ``delivering`` row as recovery leaves it (see queries.recover_expired)."""
    values = dict(zip(names, row, strict=True))
    values.update(
        state=states.RECEIVED,
        attempts=values["attempts"] + 1,
        lease_expires_at=None,
        next_attempt_at=now,
        updated_at=now,
    )
    return tuple(values[n] for n in names)


class _Copier:
    def __init__(
        self, src: Connection, pg: psycopg.Connection[Any], now: float, chunk: int, show: Progress
    ) -> None:
        self.src = src
        self.pg = pg
        self.now = now
        self.chunk = max(1, chunk)
        self.show = show
        self.total = {
            t.name: int(src.execute(select(func.count()).select_from(t)).scalar_one())
            for t in (messages, recipients, events)
        }
        self.done = dict.fromkeys(self.total, 0)
        self.released = 0  # leases of delivering rows released by this run

    def _progress(self, final: bool = False) -> None:
        m, e = "messages", "events"
        self.show(
            f"messages {self.done[m]}/{self.total[m]}, events {self.done[e]}/{self.total[e]}",
            final,
        )

    def _stream(self, stmt: Any) -> Iterator[Sequence[Any]]:
        result = self.src.execute(stmt)
        try:
            while batch := result.fetchmany(200):
                yield from batch
        finally:
            result.close()

    def messages(self, after: int) -> int:
        """Copy messages with id > ``after`` (and their recipients); rows copied."""
        names = _columns(messages)
        i_state, i_size = names.index("state"), names.index("size")
        rows = self._stream(select(messages).where(messages.c.id > after).order_by(messages.c.id))
        self.done["messages"] = self.total["messages"] - int(
            self.src.execute(
                select(func.count()).select_from(messages).where(messages.c.id > after)
            ).scalar_one()
        )
        copied = 0
        pending = next(rows, None)
        while pending is not None:
            low = after
            n = size = 0
            with self.pg.transaction(), self.pg.cursor() as cur:
                with cur.copy(_copy_sql(messages)) as out:
                    while pending is not None and n < self.chunk and size < CHUNK_BYTES:
                        row = tuple(pending)
                        if row[i_state] == states.DELIVERING:
                            row = _released(row, names, self.now)
                            self.released += 1
                        out.write_row(row)
                        after = int(row[0])
                        n += 1
                        size += int(row[i_size] or 0)
                        pending = next(rows, None)
                self._recipients(cur, low, after)
            copied += n
            self.done["messages"] += n
            self._progress()
        return copied

    def _recipients(self, cur: psycopg.Cursor[Any], low: int, high: int) -> None:
        stmt = (
            select(recipients)
            .where(recipients.c.message_id > low, recipients.c.message_id <= high)
            .order_by(recipients.c.id)
        )
        with cur.copy(_copy_sql(recipients)) as out:
            for row in self._stream(stmt):
                out.write_row(tuple(row))

    def events(self, after: int) -> int:
        rows = self._stream(select(events).where(events.c.id > after).order_by(events.c.id))
        self.done["events"] = int(
            self.src.execute(
                select(func.count()).select_from(events).where(events.c.id <= after)
            ).scalar_one()
        )
        copied = 0
        pending = next(rows, None)
        while pending is not None:
            n = 0
            with (
                self.pg.transaction(),
                self.pg.cursor() as cur,
                cur.copy(_copy_sql(events)) as out,
            ):
                while pending is not None and n < self.chunk * 4:
                    out.write_row(tuple(pending))
                    n += 1
                    pending = next(rows, None)
            copied += n
            self.done["events"] += n
            self._progress()
        return copied


def _source_rows(src: Connection, stmt: Any) -> Iterator[tuple[Any, ...]]:
    for row in src.execute(stmt):
        yield tuple(row)


def _check_resumable(src: Connection, pg: psycopg.Connection[Any]) -> None:
    """Refuse a target whose rows are not a prefix of this source (see the docstring)."""
    refuse = CopyError(
        "the target database is not empty and is not an interrupted copy of this queue: "
        "copy into an empty database"
    )
    changed = CopyError(
        "the source changed since the interrupted copy read it (were receivers and "
        "deliverers stopped?): copy into an empty database"
    )
    m = messages.c
    t_msgs = pg.execute(
        "SELECT id, queue_id, received_at, state, updated_at FROM messages ORDER BY id"
    )
    s_msgs = _source_rows(
        src, select(m.id, m.queue_id, m.received_at, m.state, m.updated_at).order_by(m.id)
    )
    high = 0
    for got in t_msgs:
        want = next(s_msgs, None)
        if want is None or tuple(got[:3]) != want[:3]:
            raise refuse
        # A released lease was changed by the copy itself (see _released).
        if want[3] != states.DELIVERING and tuple(got[3:]) != want[3:]:
            raise changed
        high = int(got[0])
    t_rcpts = int(_target_scalar(pg, "SELECT count(*) FROM recipients"))
    s_rcpts = src.execute(
        select(func.count()).select_from(recipients).where(recipients.c.message_id <= high)
    ).scalar_one()
    if t_rcpts != s_rcpts:
        raise changed
    s_max = int(src.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())
    for edge in ("min", "max"):
        row = pg.execute(
            f"SELECT id, at, kind, queue_id FROM events WHERE id = "
            f"(SELECT {edge}(id) FROM events WHERE id <= %s)",
            (s_max,),
        ).fetchone()
        if row is None:
            continue
        want = src.execute(
            select(events.c.id, events.c.at, events.c.kind, events.c.queue_id).where(
                events.c.id == row[0]
            )
        ).first()
        if want is None or tuple(want) != tuple(row):
            raise refuse
    extra = int(
        _target_scalar(
            pg,
            f"SELECT count(*) FROM events WHERE id > {s_max} AND "
            f"(kind <> 'recovered' OR detail IS DISTINCT FROM '{RECOVERED_DETAIL}')",
        )
    )
    if extra:
        raise refuse


def _set_sequences(pg: psycopg.Connection[Any]) -> None:
    for table in (messages, recipients, events):
        pg.execute(
            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), max(id)) "
            f"FROM {table.name} HAVING max(id) IS NOT NULL"
        )


def _recovered_events(
    pg: psycopg.Connection[Any], released: list[str], now: float, after: int
) -> int:
    """The ``recovered`` event of every lease this copy released, once (a re-run after
    a kill may have written some already)."""
    have = {
        r[0]
        for r in pg.execute(
            "SELECT queue_id FROM events WHERE id > %s AND kind = 'recovered' AND detail = %s",
            (after, RECOVERED_DETAIL),
        )
    }
    rows = [(now, "recovered", q, RECOVERED_DETAIL) for q in released if q not in have]
    if rows:
        with pg.cursor() as cur:
            cur.executemany(
                "INSERT INTO events (at, kind, queue_id, detail) VALUES (%s, %s, %s, %s)", rows
            )
    return len(rows) + len(have)


def prepare_target(target: Engine) -> str | None:
    """Make the schema in an empty target (returns the revision made), or check that
    it is current; refuse anything else."""
    if target.dialect.name != "postgresql":
        raise CopyError(f"--to must be a PostgreSQL URL, not {target.url.drivername}")
    revision = migrate.current_revision(target)
    if revision is None:
        with target.connect() as conn:
            tables = conn.exec_driver_sql(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_name IN "
                "('messages', 'recipients', 'events')"
            ).scalar_one()
        if tables:
            raise CopyError(
                "the target has queue tables but no schema revision: copy into an empty database"
            )
        migrate.upgrade(target)
        return migrate.current_revision(target)
    migrate.require_current(target)
    return None


def copy_queue(
    source: Engine,
    target: Engine,
    now: float,
    chunk: int = CHUNK_ROWS,
    show: Progress | None = None,
) -> CopyResult:
    """Copy the queue ``source`` (a read-only SQLite engine) into ``target``."""
    migrate.require_current(source)
    made = prepare_target(target)
    raw = target.raw_connection()
    try:
        pg = raw.driver_connection
        assert isinstance(pg, psycopg.Connection)
        pg.autocommit = True  # transactions are pg.transaction() blocks, one per chunk
        with source.connect() as src, src.begin():
            return _run(src, pg, now, chunk, show or (lambda _t, _f: None), made)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines() or [type(exc).__name__]
        raise CopyError(f"target database: {reason[0]}") from None
    finally:
        raw.close()


def _run(
    src: Connection,
    pg: psycopg.Connection[Any],
    now: float,
    chunk: int,
    show: Progress,
    made: str | None,
) -> CopyResult:
    before = _counts(pg)
    resumed = any(before.values())
    if resumed:
        _check_resumable(src, pg)
    copier = _Copier(src, pg, now, chunk, show)
    s_max_event = int(src.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())
    m_after = _max_id(pg, messages)
    e_after = min(_max_id(pg, events), s_max_event)
    copied = {"messages": copier.messages(m_after)}
    copied["recipients"] = _counts(pg)["recipients"] - before["recipients"]
    copied["events"] = copier.events(e_after)
    # The leases a killed earlier run released are in the target already: find them
    # in the source, so their events are written (once) all the same.
    released = _released_in_source(src)
    with pg.transaction():
        _set_sequences(pg)
        n_recovered = _recovered_events(pg, released, now, s_max_event)
        _set_sequences(pg)
    copier._progress(final=True)
    after = _counts(pg)
    counts = [
        TableCount(
            name,
            copier.total[name],
            copied[name],
            after[name],
            copier.total[name] + (n_recovered if name == "events" else 0),
        )
        for name in ("messages", "recipients", "events")
    ]
    return CopyResult(counts, resumed, copier.released, made)


def _released_in_source(src: Connection) -> list[str]:
    """Queue ids of the source's ``delivering`` rows, whose leases the copy releases."""
    stmt = (
        select(messages.c.queue_id)
        .where(messages.c.state == states.DELIVERING)
        .order_by(messages.c.id)
    )
    return [r[0] for r in src.execute(stmt)]
