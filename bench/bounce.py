"""What bounces cost the deliverer: failing mail with ``smapd: bounce`` off and on.

    .venv/bin/python bench/bounce.py [-n 2000] [--rounds 3]

N queued messages, each for one recipient, go to a sendmail that fails them all
(``exit 67``, EX_NOUSER) through ``smapq deliver --once`` (the installed program,
start-up included): once with ``bounce off`` -- the baseline, today's FWTK-like
behaviour -- and once with ``bounce on``, where every outcome's transaction also
renders and queues an RFC 3464 report. Alternating, best of ``--rounds`` each, in
this one process run, so the ratio holds on a noisy machine. Also: the time to render
one report in-process (dsn.render), and the size of a notice.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deliver import BODY, SMAPQ, TRACE, fill, make_spool, write_exe

from smapq.deliver import dsn
from smapq.store import queries
from smapq.store.engine import make_engine


def run(root: Path, exe: str, n: int, bounce: bool) -> float:
    table = make_spool(root, exe, f"smapd: bounce {'on' if bounce else 'off'}\n")
    db = root / "spool" / "smapq.db"
    fill(db, n)
    start = time.perf_counter()
    cmd = [SMAPQ, "-t", str(table), "deliver", "--once"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    took = time.perf_counter() - start
    if proc.returncode != 1:  # 1: something went bad, as every message should
        raise SystemExit(f"deliver --once exited {proc.returncode}: {proc.stderr[-2000:]!r}")
    engine = make_engine(str(db))
    with engine.begin() as conn:
        states = queries.count_by_state(conn)
    engine.dispose()
    want = {"bad": n, "received": n} if bounce else {"bad": n}
    if states != want:
        raise SystemExit(f"expected {want}, found {states}")
    return took


def render_cost() -> tuple[float, int]:
    entry = dsn.status_of(dsn.FAILED, 67, "exit 67 (EX_NOUSER): user unknown")
    entry.address = "rcpt0@example.net"
    report = dsn.Report(
        dsn.FAILED, "mx.example", "Q", "sender@example.org", 0.0, 1.0, [entry],
        TRACE.encode() + BODY,
    )  # fmt: skip
    n = 2000
    seconds = min(timeit.repeat(lambda: dsn.render(report, "N", 1.0), number=n, repeat=5))
    return seconds / n, len(dsn.render(report, "N", 1.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="messages per run")
    ap.add_argument("--rounds", type=int, default=3, help="best of this many runs each")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smapq-bench-bounce-"))
    try:
        exe = write_exe(work / "sendmail", "#!/bin/sh\ncat >/dev/null\nexit 67\n")
        off = on = 0.0
        for r in range(args.rounds):
            for bounce in (False, True):
                root = work / f"r{r}{'on' if bounce else 'off'}"
                root.mkdir()
                rate = args.n / run(root, exe, args.n, bounce)
                if bounce:
                    on = max(on, rate)
                else:
                    off = max(off, rate)
        per, size = render_cost()
        print(f"messages: {args.n}, all failing (exit 67); best of {args.rounds}")
        print(f"bounce off (baseline): {off:8.0f} msg/s")
        print(f"bounce on:             {on:8.0f} msg/s   ratio {on / off:.2f}")
        print(f"dsn.render: {per * 1e6:.0f} us per notice ({size} bytes, {len(BODY)} byte body)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
