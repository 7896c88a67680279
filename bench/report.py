"""Benchmark: seed a queue database with N messages (default 1,000,000) and time every report.

Usage:
    .venv/bin/python bench/report.py                  # 1M messages, 30 days
    .venv/bin/python bench/report.py --url postgresql+psycopg://postgres@127.0.0.1:PORT/rep
    .venv/bin/python bench/report.py --messages 100000 --db /tmp/small.db
    .venv/bin/python bench/report.py --reuse          # time again without reseeding

The mix: ~95.5% delivered, 2% bad, 1.5% received (most of them deferred), 0.3% held,
0.2% delivering; 50k senders and 200k recipients (skewed, ~1.3 recipients a message),
20k client addresses; the envelope log has a full session per message (connect, helo,
mail, rcpt..., accept, disconnect) plus claim/deferred/delivered/bad, and refused
sessions (reject, vrfy, expn, timeout) from a few noisy clients. Bodies are stand-ins of
at most --body-bytes (the size column carries realistic sizes).

The schema comes from the real migrations; seeding drops the indexes, bulk-loads (SQLite:
raw sqlite3 executemany in one transaction; PostgreSQL: COPY, then VACUUM ANALYZE as
autovacuum would have by then), and recreates them. On PostgreSQL the database named by
--url is emptied first (its public schema is dropped): give it a database of its own.
Each report runs in-process through the same functions the CLI calls (output rendered
to /dev/null); the figures are the best of --repeat runs: wall time, and CPU time (this
process plus, on a PostgreSQL server on this machine, its whole process tree: backend
and parallel workers), which a busy machine disturbs far less than wall time. Targets:
every report <= 1 s, ``queue list --state bad`` first page <= 100 ms. The plan of the
slowest is printed (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN (ANALYZE, BUFFERS)).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchrig import tree_cpu
from sqlalchemy import event

from smapq.report import metrics, output, reports
from smapq.report import queue as q
from smapq.report.db import readonly_session
from smapq.store import migrate
from smapq.store.engine import make_engine

DAY = 86400.0
STATES = (
    (0.955, "delivered"),
    (0.975, "bad"),
    (0.990, "received"),
    (0.993, "held"),
    (1.000, "delivering"),
)
B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def queue_id(t: float, i: int) -> str:
    v = int(t * 1_000_000)
    s = []
    for _ in range(12):
        s.append(B32[v & 31])
        v >>= 5
    r = i & 0xFFFFF
    tail = []
    for _ in range(4):
        tail.append(B32[r & 31])
        r >>= 5
    return "".join(reversed(s)) + "".join(reversed(tail))


def skewed(rng: random.Random, n: int, power: float = 3.0) -> int:
    """0..n-1, small numbers much more likely (a few big senders, a long tail)."""
    return min(n - 1, int(n * rng.random() ** power))


def generate(
    n: int, body_cap: int, rng: random.Random, chunk: int = 50_000
) -> Iterator[tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]]:
    """The rows of the queue, ``chunk`` messages at a time: (messages, recipients, events).

    Columns in the order of ``MSG_COLUMNS``, ``RCPT_COLUMNS`` and ``EVENT_COLUMNS``.
    """
    now = time.time()
    start = now - 30 * DAY
    senders = [f"user{i}@sender{i % 9000}.example" for i in range(50_000)]
    senders[7] = ""  # the null sender (bounces) is a big one
    domains = [f"dom{i}.example" for i in range(5_000)]
    rcpts = [f"rcpt{i}@{domains[i % 5000]}" for i in range(200_000)]
    clients = [f"198.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(20_000)]
    names = [f"mx{i}.client{i % 3000}.example" for i in range(20_000)]
    blob = b"Subject: bench\nFrom: x@example\n\n" + b"lorem ipsum dolor sit amet\n" * 4000

    # Waiting mail is recent (within the retry horizon, mostly hours); everything else
    # spreads over 30 days. Ids follow receipt order, as the receiver assigns them.
    plan: list[tuple[float, str]] = []
    for _ in range(n):
        u = rng.random()
        state = next(s for p, s in STATES if u < p)
        if state in ("received", "held", "delivering"):
            t = now - min(5 * DAY, rng.expovariate(1 / (6 * 3600)))
        else:
            t = start + rng.random() * 30 * DAY
        plan.append((t, state))
    plan.sort()
    for base in range(0, n, chunk):
        m_rows: list[tuple[Any, ...]] = []
        r_rows: list[tuple[Any, ...]] = []
        e_rows: list[tuple[Any, ...]] = []
        for i in range(base, min(n, base + chunk)):
            mid = i + 1
            t, state = plan[i]
            qid = queue_id(t, mid)
            sid = f"S{mid:015d}"
            c = skewed(rng, len(clients), 2.0)
            sender = senders[skewed(rng, len(senders))]
            size = int(min(5e7, math.exp(rng.gauss(8.5, 1.2))))
            k = 1 + (rng.random() < 0.2) + (rng.random() < 0.08) + (rng.random() < 0.02)
            attempts, nxt, ex, res, dlv = 0, t, None, None, None
            lease_owner = lease_exp = None
            upd = t
            if state == "delivered":
                latency = (
                    rng.expovariate(1 / 4.0) if rng.random() < 0.9 else rng.expovariate(1 / 3600.0)
                )
                dlv = upd = t + latency
                attempts = 1 if latency < 300 else 2 + int(latency // 3600)
            elif state == "bad":
                attempts = rng.randint(1, 12)
                upd = t + rng.random() * 5 * DAY
                ex, res = rng.choice(
                    [
                        (67, "550 5.1.1 user unknown"),
                        (69, "554 relay denied"),
                        (75, "451 4.4.1 timeout; queue time exceeded"),
                    ]
                )
            elif state == "received":
                if now - t > 600:
                    attempts = 1 + int(math.log2(1 + (now - t) / 300))
                    nxt = now + rng.random() * 3600
                    ex, res = 75, "451 4.3.0 mailbox temporarily unavailable"
            elif state == "delivering":
                lease_owner, lease_exp = "bench:1", now + 60
                attempts = 1
            upd = min(upd, now)
            body = blob[: min(size, body_cap)]
            m_rows.append(
                (
                    mid,
                    qid,
                    state,
                    t,
                    sid,
                    clients[c],
                    40000 + c % 20000,
                    names[c],
                    names[c],
                    "ESMTP",
                    sender,
                    size,
                    "Received: bench",
                    body,
                    "0" * 64,
                    attempts,
                    nxt,
                    lease_owner,
                    lease_exp,
                    0,
                    ex,
                    res,
                    dlv,
                    upd,
                )
            )
            ci = clients[c]
            e_rows.append((t - 1.0, "connect", sid, None, ci, None, 220, None))
            e_rows.append((t - 0.9, "helo", sid, None, ci, None, 250, names[c]))
            e_rows.append((t - 0.8, "mail", sid, None, ci, sender, 250, None))
            for p in range(k):
                addr = rcpts[skewed(rng, len(rcpts), 2.5)]
                sent = dlv if state == "delivered" else None
                r_rows.append((mid, p, addr, sent))
                e_rows.append((t - 0.7, "rcpt", sid, None, ci, addr, 250, None))
            e_rows.append((t, "accept", sid, qid, ci, None, 250, f"{size} bytes"))
            e_rows.append((t + 0.1, "disconnect", sid, None, ci, None, 221, None))
            if state == "delivered":
                e_rows.append((dlv, "claim", None, qid, None, None, None, "bench:1"))
                e_rows.append((dlv, "delivered", None, qid, None, None, 0, None))
            elif state == "bad":
                e_rows.append((upd, "claim", None, qid, None, None, None, "bench:1"))
                e_rows.append((upd, "bad", None, qid, None, None, ex, res))
            elif attempts:
                e_rows.append((upd, "deferred", None, qid, None, None, ex, res))
            # Noise: refused sessions from a few hundred abusive clients.
            if rng.random() < 0.12:
                bad_c = clients[skewed(rng, 500, 1.5)]
                bs = f"R{mid:015d}"
                e_rows.append((t + 0.5, "connect", bs, None, bad_c, None, 220, None))
                kind = rng.random()
                if kind < 0.6:
                    victim = rcpts[rng.randrange(len(rcpts))]
                    e_rows.append(
                        (
                            t + 0.6,
                            "reject",
                            bs,
                            None,
                            bad_c,
                            victim,
                            554,
                            f"RCPT TO:<{victim}>: 554 5.7.1 relay access denied",
                        )
                    )
                elif kind < 0.8:
                    e_rows.append((t + 0.6, "vrfy", bs, None, bad_c, None, 252, "VRFY root"))
                elif kind < 0.9:
                    e_rows.append((t + 0.6, "expn", bs, None, bad_c, None, 502, "EXPN staff"))
                else:
                    e_rows.append((t + 300.6, "timeout", bs, None, bad_c, None, 421, None))
                e_rows.append((t + 301.0, "disconnect", bs, None, bad_c, None, 221, None))
        yield m_rows, r_rows, e_rows


MSG_COLUMNS = (
    "id, queue_id, state, received_at, session_id, client_addr, client_port, client_name, "
    "helo, protocol, mail_from, size, trace, body, body_sha256, attempts, next_attempt_at, "
    "lease_owner, lease_expires_at, lease_token, last_exit, last_result, delivered_at, "
    "updated_at"
)
RCPT_COLUMNS = "message_id, position, address, sent_at"
EVENT_COLUMNS = "at, kind, session_id, queue_id, client_addr, address, code, detail"


def _insert(table: str, columns: str) -> str:
    marks = ",".join("?" * (columns.count(",") + 1))
    return f"INSERT INTO {table} ({columns}) VALUES ({marks})"


def seed(path: str, n: int, body_cap: int, rng: random.Random) -> None:
    """A SQLite queue: indexes dropped, raw executemany in one transaction, indexes back."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    engine = make_engine(path, create=True)
    migrate.upgrade(engine)
    engine.dispose()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = OFF")
    db.execute("PRAGMA synchronous = OFF")
    db.execute("PRAGMA cache_size = -262144")
    indexes = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")

    t0 = time.time()
    db.execute("BEGIN")
    rcpt_total = ev_total = done = 0
    for m_rows, r_rows, e_rows in generate(n, body_cap, rng):
        db.executemany(_insert("messages", MSG_COLUMNS), m_rows)
        db.executemany(_insert("recipients", RCPT_COLUMNS), r_rows)
        db.executemany(_insert("events", EVENT_COLUMNS), e_rows)
        rcpt_total += len(r_rows)
        ev_total += len(e_rows)
        done += len(m_rows)
        print(f"\rseeding: {done}/{n} messages ({time.time() - t0:.0f}s)", end="", flush=True)
    db.execute("COMMIT")
    print(
        f"\nseeded {n} messages, {rcpt_total} recipients, {ev_total} events "
        f"in {time.time() - t0:.0f}s; building {len(indexes)} indexes ...",
        flush=True,
    )
    t1 = time.time()
    for _, sql in indexes:
        db.execute(sql)
    db.execute("ANALYZE") if os.environ.get("BENCH_ANALYZE") else None
    db.execute("PRAGMA journal_mode = WAL")
    db.close()
    print(
        f"indexes built in {time.time() - t1:.0f}s; database "
        f"{os.path.getsize(path) / 2**20:.0f} MiB",
        flush=True,
    )


def seed_postgres(url: str, n: int, body_cap: int, rng: random.Random) -> None:
    """A PostgreSQL queue: schema by the migrations, indexes dropped, COPY, indexes back,
    VACUUM ANALYZE (what autovacuum would have done to a live queue of this age)."""
    import psycopg

    libpq = "postgresql://" + url.split("://", 1)[1]
    with psycopg.connect(libpq, autocommit=True) as db:
        db.execute("DROP SCHEMA public CASCADE")
        db.execute("CREATE SCHEMA public")
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    with psycopg.connect(libpq, autocommit=True) as db:
        indexes = db.execute(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = 'public' "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
            "WHERE c.conindid = format('%I.%I', i.schemaname, i.indexname)::regclass)"
        ).fetchall()
        for name, _ in indexes:
            db.execute(f'DROP INDEX "{name}"')
        db.execute("SET synchronous_commit = off")
        db.execute("SET session_replication_role = replica")  # no FK triggers while loading
        t0 = time.time()
        rcpt_total = ev_total = done = 0
        with db.transaction(), db.cursor() as cur:
            for m_rows, r_rows, e_rows in generate(n, body_cap, rng):
                for table, columns, rows in (
                    ("messages", MSG_COLUMNS, m_rows),
                    ("recipients", RCPT_COLUMNS, r_rows),
                    ("events", EVENT_COLUMNS, e_rows),
                ):
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                rcpt_total += len(r_rows)
                ev_total += len(e_rows)
                done += len(m_rows)
                print(
                    f"\rseeding: {done}/{n} messages ({time.time() - t0:.0f}s)",
                    end="",
                    flush=True,
                )
            for table in ("messages", "recipients", "events"):
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
                )
        print(
            f"\nseeded {n} messages, {rcpt_total} recipients, {ev_total} events "
            f"in {time.time() - t0:.0f}s (COPY); building {len(indexes)} indexes ...",
            flush=True,
        )
        t1 = time.time()
        db.execute("SET maintenance_work_mem = '512MB'")
        for _, sql in indexes:
            db.execute(sql)
        db.execute("VACUUM ANALYZE")
        size = db.execute("SELECT pg_database_size(current_database())").fetchone()
        print(
            f"indexes built, VACUUM ANALYZE in {time.time() - t1:.0f}s; database "
            f"{(size[0] if size else 0) / 2**20:.0f} MiB",
            flush=True,
        )


class Recorder:
    """Remembers the statements a report runs, for EXPLAIN QUERY PLAN.

    It is SQLite's trace callback, not a SQLAlchemy event: some reports stream from the
    driver cursor directly, and the trace sees those too, with their parameters bound.
    """

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def __call__(self, statement: str) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            self.statements.append((statement, None))


def cases(now: float) -> Iterator[tuple[str, Callable[[Any], None]]]:
    sink = io.StringIO()

    def emit(report: output.Report) -> None:
        sink.seek(0)
        sink.truncate()
        output.write(report, "json", sink, sink)

    def rep(
        fn: Callable[..., output.Report], since: float | None, **kw: Any
    ) -> Callable[[Any], None]:
        return lambda conn: emit(fn(conn, reports.Window(since, None, now), **kw))

    windows = (("all", None), ("30d", 30), ("15d", 15), ("7d", 7), ("1d", 1))
    for label, days in windows:
        since = None if days is None else now - days * DAY
        for name, fn in (
            *reports.REPORTS.items(),
            ("latency", reports.latency),
            ("age", reports.age),
        ):
            yield f"report {name} ({label})", rep(fn, since)

    def metrics_case(conn: Any) -> None:
        sink.write(metrics.render(conn, now))

    yield "report metrics", metrics_case
    yield (
        "queue list --state bad (first page)",
        lambda conn: emit(q.list_messages(conn, now, queue_states=["bad"])),
    )
    yield "queue list (first page)", lambda conn: emit(q.list_messages(conn, now))
    yield (
        "queue list --sender user3@... (first page)",
        lambda conn: emit(q.list_messages(conn, now, sender="user3@sender3.example")),
    )


def server_cpu(engine: Any) -> Callable[[], float]:
    """CPU seconds so far of the (local) server's whole process tree: the backend and
    the parallel workers it used (reaped into the postmaster's cutime)."""
    with engine.connect() as conn:
        backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    try:
        stat = Path(f"/proc/{backend}/stat").read_text()
        postmaster = int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        print("the server is not on this machine: cpu counts the client only")
        return lambda: 0.0
    return lambda: tree_cpu(postmaster)


def target_of(case: str) -> float:
    return 0.1 if "state bad" in case else 1.0


def explain_sqlite(path: str, stmts: list[tuple[str, Any]]) -> None:
    raw = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    for sql, params in stmts:
        print("  " + " ".join(sql.split())[:300])
        for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params or ()):
            print(f"    {row[-1]}")


def explain_postgres(engine: Any, stmts: list[tuple[str, Any]]) -> None:
    with engine.connect() as conn:
        for sql, params in stmts:
            print("  " + " ".join(sql.split())[:300])
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params or None)
            for (line,) in plan:
                print(f"    {line}")
            conn.rollback()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", "-n", type=int, default=1_000_000)
    ap.add_argument("--db", default="/tmp/smapq-bench/report.db")
    ap.add_argument(
        "--url",
        help="a PostgreSQL database (postgresql+psycopg://...) instead of --db; seeding "
        "DROPs its public schema",
    )
    ap.add_argument("--reuse", action="store_true", help="time an existing database")
    ap.add_argument("--body-bytes", type=int, default=1024, help="cap on stored body size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--only", help="time only cases containing this text")
    ap.add_argument(
        "--explain-over", action="store_true", help="print the plan of every case over target"
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.url:
        if not args.reuse:
            seed_postgres(args.url, args.messages, args.body_bytes, rng)
        engine = make_engine(args.url, readonly=True)
        seen: list[tuple[str, Any]] = []

        @event.listens_for(engine, "before_cursor_execute")
        def _seen(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
            if statement.lstrip().upper().startswith(("SELECT", "WITH")):
                seen.append((statement, params))

    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.db)), exist_ok=True)
        if not (args.reuse and os.path.exists(args.db)):
            seed(args.db, args.messages, args.body_bytes, rng)
        engine = make_engine(args.db, readonly=True)
        seen = []
    rec = Recorder()
    now = time.time()
    server = server_cpu(engine) if args.url else (lambda: 0.0)
    results: list[tuple[str, float, float, list[tuple[str, Any]]]] = []
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
    print(f"{'case':48} {'first':>8} {'best':>8} {'cpu':>8}")
    for name, run in cases(now):
        if args.only and args.only not in name:
            continue
        times = []
        cpus = []
        stmts: list[tuple[str, Any]] = []
        for i in range(args.repeat):
            rec.statements = []
            seen.clear()
            with readonly_session(engine) as conn:
                if not args.url:
                    raw = conn.connection.driver_connection
                    assert raw is not None
                    raw.set_trace_callback(rec)
                t, c = time.perf_counter(), time.process_time() + server()
                run(conn)
                times.append(time.perf_counter() - t)
                cpus.append(time.process_time() + server() - c)
            if i == 0:
                stmts = list(seen) if args.url else list(rec.statements)
        flag = "" if min(times) <= target_of(name) else "  <-- over target"
        print(
            f"{name:48} {times[0] * 1000:7.0f}ms {min(times) * 1000:7.0f}ms "
            f"{min(cpus) * 1000:7.0f}ms{flag}",
            flush=True,
        )
        results.append((name, times[0], min(times), stmts))
    slowest = max(results, key=lambda r: r[2])
    shown = [r for r in results if r[2] > target_of(r[0])] if args.explain_over else [slowest]
    for name, _, best, stmts in shown:
        kind = "EXPLAIN (ANALYZE, BUFFERS)" if args.url else "EXPLAIN QUERY PLAN"
        print(
            f"\n{'slowest: ' if name == slowest[0] else ''}{name} ({best * 1000:.0f} ms); {kind}:"
        )
        if args.url:
            explain_postgres(engine, stmts)
        else:
            explain_sqlite(args.db, stmts)
    over = [r for r in results if r[2] > target_of(r[0])]
    print(f"\n{len(results) - len(over)}/{len(results)} cases within target")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
