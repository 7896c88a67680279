"""Intake benchmark: ``smapq serve`` storing into PostgreSQL vs into SQLite, same run.

    /path/venv/bin/python bench/intake_pg.py [--rounds 5] [--sessions 1,8]
        [--messages 400] [--size 2048] [--serve-args '--workers 1'] [--admin URL]

Load: Postfix's smtp-source, SIZE-byte bodies, one recipient, a new connection per
message, S parallel sessions.  Each round starts both targets afresh -- serve on a new
SQLite spool, serve on a new database on the PostgreSQL server (``--admin``: a libpq
URL to its maintenance database; default the tests' 127.0.0.1:5432) -- and measures
each session count on both, the order alternating from round to round, so the two
cells compared are seconds apart.  Every cell checks that exactly the messages sent
were stored (a lost message fails the bench).

Prints, per session count, the median messages/s of each backend over the rounds, the
ratio PostgreSQL/SQLite (the median of the per-round ratios) and the spread of those
ratios (min..max), which shows how noisy the machine was.  The serve CPU column counts
serve's own process tree; the PostgreSQL server's CPU is not in it.

``compare(...)`` is the importable core (bench/scale.py uses it for its intake row).
Run as root (serve jails as nobody, as in production) from a non-editable install.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchrig import ServeServer, make_spool, tree_cpu
from intake import SMTP_SOURCE, smtp_source

from tests.pgdb import ADMIN, drop_database, sqlalchemy_url

BACKENDS = ("sqlite", "postgresql")
_serial = itertools.count()


class Cell:
    def __init__(self, backend: str, sessions: int, rate: float, cpu_ms: float) -> None:
        self.backend = backend
        self.sessions = sessions
        self.rate = rate
        self.cpu_ms = cpu_ms


def _pg_database(admin: str) -> str:
    """A new database on the server behind ``admin``; its libpq URL."""
    import psycopg
    from psycopg import sql

    name = f"smapq_bench_{os.getpid()}_{next(_serial)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return admin.rsplit("/", 1)[0] + "/" + name


def _pg_count(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM messages").fetchone()
    return int(row[0]) if row else 0


def _target(
    backend: str, work: Path, admin: str, serve_args: list[str]
) -> tuple[ServeServer, Callable[[], int], Callable[[], None]]:
    """A running serve on a fresh queue: (server, stored-count, clean-up)."""
    if backend == "sqlite":
        spool = make_spool(work)
        return ServeServer(spool, work / "log", serve_args), spool.count, lambda: None
    url = _pg_database(admin)
    spool = make_spool(work, f"smap, smapd: database {sqlalchemy_url(url)}")
    server = ServeServer(spool, work / "log", serve_args)
    return server, lambda: _pg_count(url), lambda: drop_database(url)


def compare(
    rounds: int = 5,
    sessions: tuple[int, ...] = (1, 8),
    messages: int = 400,
    size: int = 2048,
    serve_args: tuple[str, ...] = (),
    admin: str = ADMIN,
    work: Path | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[Cell]:
    """Measure serve on SQLite and on PostgreSQL, ``rounds`` times, alternating."""
    base = work or Path(tempfile.mkdtemp(prefix="smapq-bench-pg-"))
    base.chmod(0o755)
    cells: list[Cell] = []
    for n in range(rounds):
        order = BACKENDS if n % 2 == 0 else BACKENDS[::-1]
        for s in sessions:
            count = max(s, messages // s * s)
            for backend in order:
                workdir = base / f"r{n}-{s}-{backend}"
                server, stored, cleanup = _target(backend, workdir, admin, list(serve_args))
                try:
                    smtp_source(server.port, s, 2 * s, size)  # warm-up
                    cpu0 = tree_cpu(server.pid)
                    wall = smtp_source(server.port, s, count, size)
                    cpu1 = tree_cpu(server.pid)
                    got = stored()
                finally:
                    server.stop()
                    cleanup()
                if got != count + 2 * s:
                    raise SystemExit(f"LOST OR EXTRA MAIL: {backend}: {got} != {count + 2 * s}")
                cell = Cell(backend, s, count / wall, (cpu1 - cpu0) * 1000 / count)
                cells.append(cell)
                say(
                    f"round {n} {backend:10s} {s:2d} sessions: {count} msgs "
                    f"{cell.rate:7.0f}/s {cell.cpu_ms:6.2f} ms serve CPU/msg"
                )
    return cells


def report(cells: list[Cell], sessions: tuple[int, ...]) -> str:
    lines = [
        "| sessions | SQLite msg/s | PostgreSQL msg/s | PG/SQLite (median) | ratio min..max |"
        " serve CPU ms/msg SQLite / PG |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sessions:
        lite = [c for c in cells if c.sessions == s and c.backend == "sqlite"]
        pg = [c for c in cells if c.sessions == s and c.backend == "postgresql"]
        ratios = [p.rate / q.rate for p, q in zip(pg, lite, strict=True)]
        lines.append(
            f"| {s} | {statistics.median(c.rate for c in lite):.0f} "
            f"| {statistics.median(c.rate for c in pg):.0f} "
            f"| {statistics.median(ratios):.2f} | {min(ratios):.2f}..{max(ratios):.2f} "
            f"| {statistics.median(c.cpu_ms for c in lite):.2f} / "
            f"{statistics.median(c.cpu_ms for c in pg):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sessions", default="1,8")
    p.add_argument("--messages", type=int, default=400)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--serve-args", default="")
    p.add_argument("--admin", default=ADMIN)
    args = p.parse_args(argv)
    if not os.path.exists(SMTP_SOURCE):
        print(f"intake_pg: {SMTP_SOURCE} is missing (Debian: apt-get install postfix)")
        return 1
    sessions = tuple(int(s) for s in args.sessions.split(","))
    cells = compare(
        args.rounds,
        sessions,
        args.messages,
        args.size,
        tuple(shlex.split(args.serve_args)),
        args.admin,
    )
    print(report(cells, sessions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
