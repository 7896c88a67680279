"""Spawn-to-banner of the inetd receiver: ``smap`` on PostgreSQL vs on SQLite, same run.

    /path/venv/bin/python bench/banner_pg.py [--spawns 40] [--admin URL]

Each spawn execs the installed ``smap`` with a socketpair as fd 0/1 (as inetd does) and
times until the first byte of the 220 banner; the SQLite and the PostgreSQL table take
turns, so both see the same machine.  On PostgreSQL the receiver imports psycopg and
connects (as root, before the jail) before its banner; on SQLite it opens the file
after the jail, as before -- the cost an inetd receiver pays per connection for each
backend.  Prints the medians and their ratio, and the interquartile ranges as the
noise.  Run as root from a non-editable install (smap jails as nobody).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrig import SMAP, make_spool

from tests.pgdb import ADMIN, drop_database, sqlalchemy_url


def banner_time(table: Path) -> float:
    """Seconds from the exec of smap to the first byte of its banner."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [SMAP, "-t", str(table)], stdin=theirs, stdout=theirs, stderr=subprocess.DEVNULL
        )
        theirs.close()
        first = ours.recv(1)
        elapsed = time.perf_counter() - t0
        if first != b"2":
            raise SystemExit(f"no banner from smap ({table}): {first!r}")
        ours.sendall(b"QUIT\r\n")
        while ours.recv(4096):
            pass
        proc.wait(60)
    return elapsed


def iqr(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{q[0] * 1000:.1f}..{q[2] * 1000:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spawns", type=int, default=40)
    p.add_argument("--admin", default=ADMIN)
    args = p.parse_args(argv)
    import psycopg
    from psycopg import sql

    work = Path(tempfile.mkdtemp(prefix="smapq-bench-banner-"))
    work.chmod(0o755)
    name = f"smapq_bench_banner_{os.getpid()}"
    with psycopg.connect(args.admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = args.admin.rsplit("/", 1)[0] + "/" + name
    try:
        lite = make_spool(work / "sqlite").table
        pg = make_spool(work / "pg", f"smap, smapd: database {sqlalchemy_url(url)}").table
        times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        for i in range(args.spawns):
            order = [("sqlite", lite), ("postgresql", pg)]
            for kind, table in order if i % 2 == 0 else order[::-1]:
                times[kind].append(banner_time(table))
    finally:
        drop_database(url)
    lo, hi = statistics.median(times["sqlite"]), statistics.median(times["postgresql"])
    print(f"spawns: {args.spawns} each, interleaved")
    print(f"smap on SQLite:     median {lo * 1000:.1f} ms (IQR {iqr(times['sqlite'])})")
    print(f"smap on PostgreSQL: median {hi * 1000:.1f} ms (IQR {iqr(times['postgresql'])})")
    print(f"ratio PostgreSQL/SQLite: {hi / lo:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
