"""Deliverer benchmark: ``smapq deliver --once`` against the floor of spawning sendmail.

    .venv/bin/python bench/deliver.py [-n 3000] [--children 1,2,4] [--samples 200] [--rounds 3]

Throughput: N queued messages are delivered by ``smapq deliver --once`` (the installed
program, start-up included) to a trivial sendmail-compatible executable
(``#!/bin/sh`` + ``exec cat >/dev/null``). The floor is spawning that same executable
N times with the same argv shape and stdin, from Python, one at a time (and, for the
scaling rows, k at a time from k threads). Both run in this one process run, on this
machine, alternating, best of ``--rounds`` each, so the ratio is meaningful even where
absolute numbers are not (a shared CI machine is noisy).

Pickup latency: a ``--daemon`` (wakeup 3600, so only change detection can find mail)
delivers messages committed one at a time through the store API; the "sendmail" is a
bash script that logs ``$EPOCHREALTIME`` first thing. Latency = that time minus the
moment the queue COMMIT returned (the receiver sends 250 right after its commit).

Targets (issue 4): ratio >= 0.8 with maxchildren 1, scaling with maxchildren on 2
cores; pickup p50 <= 50 ms.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smapq.store import queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id

BIN = Path(sys.executable).parent
SMAPQ = str(BIN / "smapq")
BODY = b"Subject: bench\nFrom: a@example.org\n\n" + b"0123456789abcdef" * 120 + b"\n"
TRACE = "Received: from bench.example ([192.0.2.1]) by mx.example via smapq\n"
SENDER = "sender@example.org"


def write_exe(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def make_spool(root: Path, sendmail: str, extra: str = "") -> Path:
    table = root / "netperm-table"
    table.write_text(
        f"smap, smapd: directory {root / 'spool'}\nsmap: jail off\n"
        f"smapd: sendmail {sendmail}\nsmapd: wakeup 3600\n{extra}"
    )
    table.chmod(0o600)
    subprocess.run([SMAPQ, "-t", str(table), "init"], check=True, capture_output=True)
    return table


def fill(db: Path, n: int) -> None:
    engine = make_engine(str(db))
    digest = hashlib.sha256(BODY).hexdigest()
    with engine.begin() as conn:
        for i in range(n):
            msg = {
                "queue_id": new_queue_id(),
                "protocol": "ESMTP",
                "mail_from": SENDER,
                "size": len(BODY),
                "trace": TRACE,
                "body": BODY,
                "body_sha256": digest,
            }
            queries.insert_message(conn, msg, [f"rcpt{i}@example.net"])
    engine.dispose()


def floor(exe: str, n: int, workers: int) -> float:
    data = TRACE.encode() + BODY

    def one(i: int) -> None:
        subprocess.run(
            [exe, "-oi", "-f", SENDER, "--", f"rcpt{i}@example.net"], input=data, check=True
        )

    start = time.perf_counter()
    if workers == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(n)))
    return time.perf_counter() - start


def deliver_once(root: Path, exe: str, n: int, children: int) -> float:
    table = make_spool(root, exe, f"smapd: maxchildren {children}\n")
    db = root / "spool" / "smapq.db"
    fill(db, n)
    start = time.perf_counter()
    cmd = [SMAPQ, "-t", str(table), "deliver", "--once"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"deliver --once failed: {proc.stderr.decode()[-2000:]}")
    engine = make_engine(str(db))
    with engine.begin() as conn:
        states = queries.count_by_state(conn)
    engine.dispose()
    if states != {"delivered": n}:
        raise SystemExit(f"not everything was delivered: {states}")
    return took


def pickup(root: Path, samples: int) -> list[float]:
    log = root / "started.log"
    exe = write_exe(
        root / "stamp-sendmail",
        f'#!/bin/bash\necho "$EPOCHREALTIME $5" >> {log}\nexec cat >/dev/null\n',
    )
    table = make_spool(root, exe, "smapd: maxchildren 2\n")
    engine = make_engine(str(root / "spool" / "smapq.db"))
    daemon = subprocess.Popen(
        [SMAPQ, "-t", str(table), "deliver", "--daemon"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    committed: dict[str, float] = {}
    digest = hashlib.sha256(BODY).hexdigest()
    try:
        time.sleep(1.0)  # let the daemon start before the first sample
        for i in range(samples):
            rcpt = f"lat{i}@example.net"
            msg = {
                "queue_id": new_queue_id(),
                "protocol": "ESMTP",
                "mail_from": SENDER,
                "size": len(BODY),
                "trace": TRACE,
                "body": BODY,
                "body_sha256": digest,
            }
            with engine.begin() as conn:
                queries.insert_message(conn, msg, [rcpt])
            committed[rcpt] = time.time()
            deadline = time.monotonic() + 30
            while not log.exists() or rcpt not in log.read_text():
                if time.monotonic() > deadline:
                    raise SystemExit(f"message {i} was not picked up within 30 s")
                time.sleep(0.002)
            time.sleep(0.01 + (i % 7) * 0.003)  # spread arrivals over the poll tick
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        engine.dispose()
    started = {}
    for line in log.read_text().splitlines():
        stamp, rcpt = line.split()
        started[rcpt] = float(stamp)
    return [started[r] - committed[r] for r in committed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=3000, help="messages per run")
    ap.add_argument("--children", default="1,2,4", help="maxchildren values to run")
    ap.add_argument("--samples", type=int, default=200, help="pickup latency samples")
    ap.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smapq-bench-"))
    try:
        exe = write_exe(work / "sendmail", "#!/bin/sh\nexec cat >/dev/null\n")
        print(f"cpus: {os.cpu_count()}  messages: {args.n}  body: {len(BODY)} bytes")
        print(f"{'maxchildren':>11} {'floor msg/s':>12} {'deliver msg/s':>14} {'ratio':>6}")
        base = None
        for k in (int(c) for c in args.children.split(",")):
            # Alternate floor and deliverer runs and keep the best of each, so load from
            # elsewhere on the machine hits both sides alike.
            spawn = ours = 0.0
            for r in range(args.rounds):
                root = work / f"k{k}r{r}"
                root.mkdir()
                spawn = max(spawn, args.n / floor(exe, args.n, k))
                ours = max(ours, args.n / deliver_once(root, exe, args.n, k))
            base = base or ours
            print(f"{k:>11} {spawn:>12.0f} {ours:>14.0f} {ours / spawn:>6.2f}"
                  f"   (x{ours / base:.2f} vs maxchildren 1)")  # fmt: skip
        root = work / "latency"
        root.mkdir()
        lat = sorted(x * 1000 for x in pickup(root, args.samples))
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(f"pickup latency (commit -> sendmail started), {len(lat)} samples: "
              f"p50 {p50:.1f} ms  p99 {p99:.1f} ms  max {lat[-1]:.1f} ms")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
