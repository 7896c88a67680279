"""Scale benchmark (issue 9): the queue on PostgreSQL against the queue on SQLite, one run.

    /var/tmp/venv-NAME/bin/python bench/scale.py [--rounds 3] [-n 2000]
        [--only throughput,claim,pickup,intake] [--seconds 10] [--samples 150]

Every figure is measured on both backends in the same run, alternating (the order
rotates each round), and the tables show medians over ``--rounds`` with the spread, so
load from elsewhere on the machine hits both sides alike. PostgreSQL is a private
server of the bench's own (initdb + pg_ctl as postgres on 127.0.0.1, a free port,
Debian's defaults: fsync and synchronous_commit on); SQLite is a spool on the same
disk. Each cell gets a fresh database (PostgreSQL: CREATE DATABASE; SQLite: a new spool).

throughput  N queued messages, then k = 1, 2, 4 ``smapq deliver --daemon`` processes
            (maxchildren 4 each, trivial sendmail ``exec cat >/dev/null``); messages/s
            from the first daemon's start to the last row marked delivered.
claim       contention on a near-empty queue: 4 processes each run the daemon's own
            claim (``Leases.claim``) and group commit (``outcomes.Recorder``) in a tight
            loop while a feeder adds one message every 5 ms; the latency of each claim
            transaction, p50/p99 (target on PostgreSQL: p99 <= 20 ms).
pickup      a daemon with wakeup 3600 (only change detection finds mail: LISTEN/NOTIFY
            on PostgreSQL, data_version on SQLite); messages committed one at a time;
            latency = the stamp a bash sendmail writes first thing minus the moment the
            COMMIT returned (target p50 <= 50 ms).
intake      ``smapq serve`` (1 worker) storing into each backend, loaded by Postfix's
            smtp-source (a new connection per message, 2 KB, 1 recipient, -s sessions);
            messages/s and the stored count checked. Installs Debian's postfix for
            smtp-source when it is missing (never starts or configures it).

Run as root (the private PostgreSQL runs as postgres; serve binds and jails as usual).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchrig import RigError, ServeServer, Spool
from postfix_private import SMTP_SOURCE, install

from tests.scale import rig

SMAPQ = str(Path(sys.executable).parent / "smapq")
BODY = b"Subject: bench\nFrom: a@example.org\n\n" + b"0123456789abcdef" * 120 + b"\n"
TRACE = "Received: from bench.example ([192.0.2.1]) by mx.example via smapq\n"
SENDER = "sender@example.org"
BACKENDS = ("sqlite", "postgres")

# --- spools on either backend ------------------------------------------------------------


class Target:
    """Makes fresh queues on one backend: a spool directory and, on PostgreSQL, a database."""

    def __init__(self, backend: str, work: Path, pg: rig.PrivatePostgres | None) -> None:
        self.backend = backend
        self.work = work
        self.pg = pg
        self.serial = 0

    def fresh(self, sendmail: str, extra: str = "") -> tuple[Spool, str]:
        """A new spool (``smapq init`` done); its Spool and database (path or URL)."""
        self.serial += 1
        root = self.work / f"{self.backend}{self.serial}"
        root.mkdir(parents=True)
        root.chmod(0o755)
        spool = Spool(root)
        lines = [
            f"smap, smapd: directory {spool.directory}",
            f"smapd: baddir {root / 'bad'}",
            "smap: hostname bench.smapq.invalid",
            f"smapd: sendmail {sendmail}",
            "smap, smapd: userid nobody",
        ]
        database = str(spool.db)
        if self.pg is not None:
            name = f"bench{self.serial}"
            self.pg.admin(f"CREATE DATABASE {name}")
            database = self.pg.url(name)
            lines.append(f"smap, smapd: database {database}")
        spool.table.write_text("\n".join(lines) + "\n" + extra)
        spool.table.chmod(0o600)
        done = subprocess.run(
            [SMAPQ, "-t", str(spool.table), "init"], capture_output=True, text=True, check=False
        )
        if done.returncode == 0 and self.pg is not None:  # init leaves a URL alone
            done = subprocess.run(
                [SMAPQ, "-t", str(spool.table), "db", "upgrade"],
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0:
            raise RigError(f"smapq init ({self.backend}): {done.stderr.strip()[-300:]}")
        return spool, database


def _message(i: int) -> tuple[dict[str, object], list[str]]:
    from smapq.store.ids import new_queue_id

    return (
        {
            "queue_id": new_queue_id(),
            "protocol": "ESMTP",
            "mail_from": SENDER,
            "size": len(BODY),
            "trace": TRACE,
            "body": BODY,
            "body_sha256": hashlib.sha256(BODY).hexdigest(),
        },
        [f"rcpt{i}@example.net"],
    )


def fill(database: str, n: int) -> None:
    """``n`` due messages in one transaction, through the store's own insert."""
    from smapq.store import queries
    from smapq.store.engine import make_engine

    engine = make_engine(database)
    with engine.begin() as conn:
        for i in range(n):
            queries.insert_message(conn, *_message(i))
    engine.dispose()


def delivered(database: str) -> Callable[[], int]:
    from smapq.store import queries
    from smapq.store.engine import make_engine

    engine = make_engine(database, readonly=True)

    def count() -> int:
        with engine.connect() as conn, conn.begin():
            return queries.count_by_state(conn).get("delivered", 0)

    return count


def stats(values: list[float]) -> str:
    """median (min-max) of the rounds."""
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# --- delivery throughput -----------------------------------------------------------------


def throughput(target: Target, sendmail: str, n: int, k: int) -> float:
    spool, database = target.fresh(sendmail, "smapd: maxchildren 4\nsmapd: wakeup 3600\n")
    fill(database, n)
    count = delivered(database)
    procs = []
    start = time.perf_counter()
    try:
        for _ in range(k):
            with (spool.root / "deliver.log").open("ab") as log:
                procs.append(
                    subprocess.Popen(
                        [SMAPQ, "-t", str(spool.table), "deliver", "--daemon"],
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 600
        while count() < n:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RigError(f"{target.backend} k={k}: not delivered; see {spool.root}")
            time.sleep(0.05)
        took = time.perf_counter() - start
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    return n / took


# --- claim latency under contention ------------------------------------------------------


def _claimer(database: str, seconds: float, out: multiprocessing.Queue[list[float]]) -> None:
    import logging

    from smapq.config.settings import loads
    from smapq.deliver import policy
    from smapq.deliver.jobs import Tally, Verdict, new_owner
    from smapq.deliver.leases import Leases
    from smapq.deliver.outcomes import Recorder
    from smapq.store.engine import make_engine

    settings = loads("smapd: lease 60\n").smapd
    log = logging.getLogger("claimer")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    tally = Tally()
    leases = Leases(new_owner(), log, tally, lambda why: None)
    recorder = Recorder(log, tally, lambda plan: None, lambda job, why: None)
    engine = make_engine(database)
    lat: list[float] = []
    with engine.connect() as conn:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            jobs = leases.claim(conn, settings, 8, time.time())
            lat.append(time.perf_counter() - t0)
            for job in jobs:
                recorder.add(conn, job, Verdict(policy.DELIVERED, "bench", 0))
            if recorder.pending:
                recorder.flush(conn)
            time.sleep(0.001)
    engine.dispose()
    out.put(lat)


def claim_latency(target: Target, sendmail: str, seconds: float) -> tuple[list[float], int]:
    """Claim transaction latencies (s) of 4 claimers; messages the feeder added."""
    from smapq.store import queries
    from smapq.store.engine import make_engine

    _, database = target.fresh(sendmail)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[list[float]] = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(database, seconds, out)) for _ in range(4)]
    for p in procs:
        p.start()
    engine = make_engine(database)
    fed = 0
    end = time.monotonic() + seconds
    with engine.connect() as conn:
        while time.monotonic() < end:
            with conn.begin():
                queries.insert_message(conn, *_message(fed))
            fed += 1
            time.sleep(0.005)
    engine.dispose()
    lat: list[float] = []
    for _ in procs:
        lat += out.get(timeout=120)
    for p in procs:
        p.join(60)
    return lat, fed


# --- pickup latency ----------------------------------------------------------------------


def pickup(target: Target, work: Path, samples: int) -> list[float]:
    from smapq.store import queries
    from smapq.store.engine import make_engine

    stamps = work / f"stamps-{target.backend}-{target.serial}"
    stamps.touch()
    stamps.chmod(0o666)
    exe = work / f"stamp-sendmail-{target.backend}"
    exe.write_text(f'#!/bin/bash\necho "$EPOCHREALTIME $5" >> {stamps}\nexec cat >/dev/null\n')
    exe.chmod(0o755)
    spool, database = target.fresh(str(exe), "smapd: maxchildren 2\nsmapd: wakeup 3600\n")
    engine = make_engine(database)
    with (spool.root / "deliver.log").open("ab") as log:
        daemon = subprocess.Popen(
            [SMAPQ, "-t", str(spool.table), "deliver", "--daemon"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    committed: dict[str, float] = {}
    try:
        time.sleep(1.5)  # the daemon starts, drops privileges, LISTENs
        for i in range(samples):
            msg, _ = _message(i)
            rcpt = f"lat{i}@example.net"
            with engine.begin() as conn:
                queries.insert_message(conn, msg, [rcpt])
            committed[rcpt] = time.time()
            deadline = time.monotonic() + 30
            while rcpt not in stamps.read_text():
                if time.monotonic() > deadline:
                    raise RigError(f"{target.backend}: message {i} not picked up in 30 s")
                time.sleep(0.002)
            time.sleep(0.01 + (i % 7) * 0.003)  # spread arrivals over the daemon's tick
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        engine.dispose()
    started = {}
    for line in stamps.read_text().splitlines():
        stamp, rcpt = line.split()
        started[rcpt] = float(stamp)
    return [started[r] - committed[r] for r in committed]


# --- intake ------------------------------------------------------------------------------


def intake(target: Target, work: Path, sendmail: str, sessions: int, messages: int) -> float:
    spool, database = target.fresh(sendmail)
    server = ServeServer(spool, work / f"serve-{target.backend}-{target.serial}")
    try:
        argv = [SMTP_SOURCE, "-4", "-s", str(sessions), "-m", str(messages), "-l", "2048"]
        argv += ["-f", "bench@example.org", "-t", "sink@example.net", "-M", "bench.example"]
        argv.append(f"127.0.0.1:{server.port}")
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        wall = time.perf_counter() - t0
        if done.returncode != 0 or done.stderr.strip():
            raise RigError(f"smtp-source exited {done.returncode}: {done.stderr.strip()[-200:]}")
    finally:
        server.stop()
    from smapq.store import queries
    from smapq.store.engine import make_engine

    engine = make_engine(database, readonly=True)
    with engine.connect() as conn, conn.begin():
        stored = sum(queries.count_by_state(conn).values())
    engine.dispose()
    if stored != messages:
        raise RigError(f"{target.backend}: {stored} stored of {messages} sent")
    return messages / wall


# --- main --------------------------------------------------------------------------------


def rotate(rnd: int) -> tuple[str, ...]:
    return BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=2000, help="messages per throughput cell")
    ap.add_argument("--deliverers", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=8.0, help="claim contention run length")
    ap.add_argument("--samples", type=int, default=150, help="pickup latency samples")
    ap.add_argument("--sessions", default="4,16", help="smtp-source -s values")
    ap.add_argument("--messages", type=int, default=2000, help="messages per intake cell")
    ap.add_argument("--only", default="throughput,claim,pickup,intake")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if os.geteuid() != 0:
        print("bench/scale.py: run as root", file=sys.stderr)
        return 1
    if "intake" in only and not Path(SMTP_SOURCE).exists():
        print("installing Debian's postfix for smtp-source ...", file=sys.stderr)
        install()
    work = rig.world_dir("smapq-scale-bench-")
    pg = rig.PrivatePostgres(work / "pg", "127.0.0.1")
    sendmail = str(work / "sendmail")
    Path(sendmail).write_text("#!/bin/sh\nexec cat >/dev/null\n")
    Path(sendmail).chmod(0o755)
    targets = {b: Target(b, work, pg if b == "postgres" else None) for b in BACKENDS}
    load = os.getloadavg()
    print(
        f"cpus {os.cpu_count()}, load average at start {load[0]:.1f}; PostgreSQL 15 private "
        f"server 127.0.0.1:{pg.port} (defaults); {args.rounds} rounds, backends alternate"
    )
    try:
        if "throughput" in only:
            ks = [int(k) for k in args.deliverers.split(",")]
            tp: dict[tuple[str, int], list[float]] = {}
            for r in range(args.rounds):
                for k in ks:
                    for b in rotate(r + k):
                        tp.setdefault((b, k), []).append(
                            throughput(targets[b], sendmail, args.n, k)
                        )
            print(
                f"\n## delivery throughput: {args.n} queued messages, k deliverer processes "
                "(maxchildren 4 each), trivial sendmail; messages/s, median (min-max)\n"
            )
            print("| k | SQLite | PostgreSQL | PG / SQLite | PG k / PG 1 | SQLite k / SQLite 1 |")
            print("|---|---|---|---|---|---|")
            for k in ks:
                s, p = statistics.median(tp["sqlite", k]), statistics.median(tp["postgres", k])
                s1 = statistics.median(tp["sqlite", ks[0]])
                p1 = statistics.median(tp["postgres", ks[0]])
                print(
                    f"| {k} | {stats(tp['sqlite', k])} | {stats(tp['postgres', k])} | "
                    f"{p / s:.2f} | {p / p1:.2f} | {s / s1:.2f} |"
                )
        if "claim" in only:
            cl: dict[str, list[float]] = {}
            fed: dict[str, int] = {}
            rounds: dict[str, list[float]] = {}
            for r in range(args.rounds):
                for b in rotate(r):
                    lat, n = claim_latency(targets[b], sendmail, args.seconds)
                    cl.setdefault(b, []).extend(lat)
                    rounds.setdefault(b, []).append(pct(lat, 0.99) * 1000)
                    fed[b] = fed.get(b, 0) + n
            print(
                f"\n## claim latency under contention: 4 claimers (the daemon's Leases.claim + "
                f"group commit), a feeder adding one message per 5 ms, {args.seconds:.0f} s "
                "per round; ms over all rounds\n"
            )
            print("| backend | claims | messages | p50 | p90 | p99 | max | p99 per round |")
            print("|---|---|---|---|---|---|---|---|")
            for b in BACKENDS:
                lat = [x * 1000 for x in cl[b]]
                print(
                    f"| {b} | {len(lat)} | {fed[b]} | {pct(lat, 0.5):.1f} | {pct(lat, 0.9):.1f} | "
                    f"{pct(lat, 0.99):.1f} | {max(lat):.1f} | "
                    f"{', '.join(f'{x:.1f}' for x in rounds[b])} |"
                )
            ratio = pct(cl["postgres"], 0.99) / pct(cl["sqlite"], 0.99)
            print(f"\nPostgreSQL p99 / SQLite p99: {ratio:.2f} (target PG p99 <= 20 ms)")
        if "pickup" in only:
            pk: dict[str, list[float]] = {}
            for r in range(args.rounds):
                for b in rotate(r):
                    per = max(20, args.samples // args.rounds)
                    pk.setdefault(b, []).extend(pickup(targets[b], work, per))
            print(
                "\n## pickup latency: commit -> sendmail started, daemon wakeup 3600 "
                "(NOTIFY on PostgreSQL, data_version on SQLite); ms\n"
            )
            print("| backend | samples | p50 | p90 | p99 | max |")
            print("|---|---|---|---|---|---|")
            for b in BACKENDS:
                lat = [x * 1000 for x in pk[b]]
                print(
                    f"| {b} | {len(lat)} | {pct(lat, 0.5):.1f} | {pct(lat, 0.9):.1f} | "
                    f"{pct(lat, 0.99):.1f} | {max(lat):.1f} |"
                )
            ratio = pct(pk["postgres"], 0.5) / pct(pk["sqlite"], 0.5)
            print(f"\nPostgreSQL p50 / SQLite p50: {ratio:.2f} (target PG p50 <= 50 ms)")
        if "intake" in only:
            ss = [int(s) for s in args.sessions.split(",")]
            it: dict[tuple[str, int], list[float]] = {}
            for r in range(args.rounds):
                for s in ss:
                    for b in rotate(r + s):
                        it.setdefault((b, s), []).append(
                            intake(targets[b], work, sendmail, s, args.messages)
                        )
            print(
                f"\n## serve's intake: smapq serve (1 worker), smtp-source {args.messages} "
                "messages, 2 KB, a new connection each; messages/s, median (min-max)\n"
            )
            print("| sessions | SQLite | PostgreSQL | PG / SQLite |")
            print("|---|---|---|---|")
            for s in ss:
                a, p = statistics.median(it["sqlite", s]), statistics.median(it["postgres", s])
                print(f"| {s} | {stats(it['sqlite', s])} | {stats(it['postgres', s])} | "
                      f"{p / a:.2f} |")  # fmt: skip
        end = os.getloadavg()
        print(f"\nload average at the end {end[0]:.1f} (other work on the machine: noise)")
    except RigError as exc:
        print(f"bench/scale.py: {exc}", file=sys.stderr)
        return 1
    finally:
        pg.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
