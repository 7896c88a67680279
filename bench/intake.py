"""Intake benchmark: smapq serve and smap under inetd against Postfix's smtpd (issue 8).

    /path/venv/bin/python bench/intake.py [--rounds 3] [--sessions 1,4,16]
        [--only serve,postfix,inetd,sink] [--seconds 3 | --messages N]
        [--serve-args '--workers 2'] [--table-extra 'smap: maxrecip 10']

Load: Postfix's smtp-source, 2 KB bodies (-l 2048), one recipient, a NEW connection per
message (smtp-source reconnects unless -d is given; the smap targets check that every
stored message has its own session), S parallel sessions (-s S).  Every round starts
each target afresh, then runs each session count on every target in turn, so the cells
compared with Postfix are measured seconds apart (the order rotates from round to round):

  serve    ``smapq -t TABLE serve --listen 127.0.0.1:PORT`` on a fresh spool
  postfix  a private Postfix (own config and queue directory, smtpd on 127.0.0.1:PORT
           only) that puts every message on hold, fsync before 250 (the default)
  inetd    ``smap`` spawned per connection by openbsd-inetd (``nowait.RATE``)
  sink     smtp-sink, the protocol-only ceiling (stores nothing)

Per cell: messages/s (count / wall time of smtp-source), the SERVER's CPU ms per message
(utime+stime+cutime+cstime over its whole process tree from /proc, before and after, so
reaped children count) and the ratio to Postfix's messages/s in the same round; the
Markdown tables show the median over the rounds.  After every run the stored count is
checked: rows in the smapq database, files in Postfix's hold queue (and none in any
other queue).  A lost message fails the bench (exit 1).

TLS rows (``--tls``, issue 12): the same rounds with STARTTLS.  smtp-source has no TLS,
so the load is bench/tls_source.c (built with gcc at run time by bench/tls_load.py; a
thread and OpenSSL per session, the same shape: S sessions, a new connection per
message, 2 KB bodies, EHLO -> STARTTLS -> EHLO -> MAIL -> RCPT -> DATA -> QUIT, every
reply code checked).  bench/tls_source.py, which costs 3-5 ms of CPU per message, runs
only when gcc is missing, and the header says which generator ran.  One self-signed EC
P-256 certificate and key serve every target.  Targets: ``serve`` and ``inetd`` with
``smap: tlscert/tlskey``, ``postfix`` with smtpd_tls_cert_file/key_file (security
level may, TLS 1.2+, tlsmgr, its default session tickets: one per TLS 1.3 handshake,
counted by the generator and shown per target), and ``serve-plain``/``postfix-plain``:
the same client without STARTTLS, so that (CPU/msg with TLS - CPU/msg without) / CPU/msg
with TLS is the handshake's share of the server's CPU per message.  The generator's own
CPU per message is reported: its ceiling is about 2 cores / that, since it shares the
machine's 2 cores with the server; per cell it also prints how long a message waited
for each reply (``waits``; ``dot`` is the commit).  ``--resume`` makes each client offer
its previous TLS session (tickets): Postfix shares ticket keys across smtpd processes
through tlsmgr; a ``smapq serve`` worker issues tickets that it alone can redeem.
``--load tls_source`` without ``--tls`` runs the plain rows with the C generator in
place of smtp-source (a cross-check of the two generators).

Run as root with the venv's python by absolute path, from a non-editable install
(scripts/venv).  Installs Debian's postfix when smtp-source is missing (never starts or
configures the system instance; /etc/postfix is checked to be unchanged at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Protocol

from benchrig import (
    ROOT,
    InetdServer,
    RigError,
    ServeServer,
    Spool,
    add_rig_options,
    make_certs,
    make_spool,
    serve_available,
    tree_cpu,
)
from postfix_private import SMTP_SOURCE, PrivatePostfix, SmtpSink, install, version
from tls_load import Generator

TARGETS = ("serve", "postfix", "inetd", "sink", "serve-plain", "postfix-plain")
TLS_TARGETS = ("serve", "postfix", "serve-plain", "postfix-plain")
PLAIN_TARGETS = ("serve-plain", "postfix-plain")
LABELS = {
    "serve-plain": "smapq serve, no TLS (same client)",
    "postfix-plain": "Postfix {v} smtpd, no TLS (same client)",
    "serve": "smapq serve",
    "postfix": "Postfix {v} smtpd, hold queue, fsync before 250",
    "inetd": "smap under openbsd-inetd",
    "sink": "smtp-sink (protocol only, no storage: the ceiling)",
}
WARMUP_SESSIONS = 16
MIN_MESSAGES = 50
MAX_MESSAGES = 40_000  # the loopback's ephemeral ports (TIME_WAIT) bound a sink cell


class Server(Protocol):
    pid: int
    port: int

    def idle(self, timeout: float = ...) -> None: ...
    def stop(self) -> None: ...


class Running:
    """A started target: its server and how to check what it stored."""

    def __init__(
        self, server: Server, check: Callable[[int], str | None], tls: bool = False
    ) -> None:
        self.server = server
        self.check = check
        self.sent = 0
        self.tls = tls  # the load says STARTTLS


def spool_check(spool: Spool) -> Callable[[int], str | None]:
    def check(expected: int) -> str | None:
        stored, sessions = spool.count(), spool.sessions()
        if stored != expected:
            return f"{stored} messages in {spool.db}, smtp-source sent {expected}"
        if sessions != stored:
            return f"{stored} messages came in {sessions} sessions (connections were reused)"
        return None

    return check


def start(name: str, workdir: Path, args: argparse.Namespace) -> Running:
    extra = "\n".join(args.table_extra)
    tls = args.tls and name not in PLAIN_TARGETS
    if name in ("postfix", "postfix-plain"):
        pf = PrivatePostfix(workdir, maillog=args.maillog, tls=args.certs if tls else None)
        return Running(pf, pf.check, tls)
    if name == "sink":
        sink = SmtpSink(workdir)
        return Running(sink, sink.check)
    if tls:
        cert, key = args.certs
        extra += f"\nsmap: tlscert {cert}\nsmap: tlskey {key}\n"
    spool = make_spool(workdir, extra)
    server: Server
    if name in ("serve", "serve-plain"):
        server = ServeServer(spool, workdir, shlex.split(args.serve_args), args.serve_command)
    else:
        server = InetdServer(spool, workdir, args.inetd_rate)
    return Running(server, spool_check(spool), tls)


def smtp_source(port: int, sessions: int, messages: int, size: int) -> float:
    """Run smtp-source; its wall time in seconds.  RigError if it reports a failure."""
    argv = [SMTP_SOURCE, "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    argv += ["-f", "bench@example.org", "-t", "sink@example.net", "-M", "bench.example"]
    argv.append(f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise RigError(f"smtp-source did not finish in 600 s: {' '.join(argv)}") from None
    wall = time.perf_counter() - t0
    if done.returncode != 0 or done.stderr.strip():
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RigError(f"smtp-source exited {done.returncode}: {why}")
    return wall


class Cell:
    """One measurement: target x sessions in one round."""

    def __init__(
        self,
        rate: float,
        cpu_ms: float,
        messages: int,
        client_ms: float = 0.0,
        resumed: int = 0,
        tickets: int = -1,
        tls: str = "",
    ) -> None:
        self.rate = rate
        self.cpu_ms = cpu_ms
        self.messages = messages
        self.client_ms = client_ms  # the load generator's CPU per message (TLS rows)
        self.resumed = resumed
        self.tickets = tickets  # session tickets the server sent (-1: not counted)
        self.tls = tls  # "TLSv1.3 TLS_AES_256_GCM_SHA384" as negotiated


def measure(
    run: Running, sessions: int, messages: int, size: int, args: argparse.Namespace
) -> Cell:
    server = run.server
    cpu0 = tree_cpu(server.pid)
    client, resumed, tickets, tls = 0.0, 0, -1, ""
    if args.load == "smtp-source":
        wall = smtp_source(server.port, sessions, messages, size)
    else:
        load = args.generator.run(server.port, sessions, messages, size, run.tls, args.resume)
        wall, client, resumed, tickets = load.wall, load.cpu, load.resumed, load.tickets
        tls = f"{load.version} {load.cipher}" if run.tls else ""
        if load.waits:
            print(f"  waits (ms/msg): {load.waits}", file=sys.stderr, flush=True)
    server.idle()
    cpu1 = tree_cpu(server.pid)
    run.sent += messages
    problem = run.check(run.sent)
    if problem:
        raise RigError(f"LOST OR EXTRA MAIL: {problem}")
    cpu_ms = (cpu1 - cpu0) * 1000 / messages
    client_ms = client * 1000 / messages
    return Cell(messages / wall, cpu_ms, messages, client_ms, resumed, tickets, tls)


def message_count(args: argparse.Namespace, rate: float, sessions: int) -> int:
    n = args.messages or max(MIN_MESSAGES, min(MAX_MESSAGES, int(rate * args.seconds)))
    return max(sessions, n // sessions * sessions)


@contextmanager
def running(name: str, workdir: Path, args: argparse.Namespace) -> Iterator[Running]:
    run = start(name, workdir, args)
    try:
        yield run
    finally:
        run.server.stop()


def one_round(
    n: int,
    order: list[str],
    args: argparse.Namespace,
    work: Path,
    results: dict[tuple[str, int], list[Cell]],
    rates: dict[tuple[str, int], float],
) -> dict[tuple[str, int], Cell]:
    """Start every target afresh, then measure each session count on each target in
    turn, so that the cells compared with Postfix are seconds apart, not minutes."""
    cells: dict[tuple[str, int], Cell] = {}
    with ExitStack() as stack:
        runs: dict[str, Running] = {}
        warm: dict[str, float] = {}
        for name in order:
            runs[name] = stack.enter_context(running(name, work / f"round{n}" / name, args))
            warm[name] = measure(
                runs[name], WARMUP_SESSIONS, 2 * WARMUP_SESSIONS, args.size, args
            ).rate
        for s in args.sessions:
            for name in order:
                run = runs[name]
                if (name, s) not in rates and not args.messages:
                    # first round: a short calibration run sizes the cell (and warms it)
                    probe = message_count(args, warm[name] / 3, s)
                    rates[name, s] = measure(run, s, probe, args.size, args).rate
                count = message_count(args, rates.get((name, s), warm[name]), s)
                cell = measure(run, s, count, args.size, args)
                rates[name, s] = cell.rate
                cells[name, s] = cell
                results.setdefault((name, s), []).append(cell)
                print(
                    f"round {n} {name:8s} {s:3d} sessions: {count:6d} msgs "
                    f"{cell.rate:8.0f}/s {cell.cpu_ms:7.2f} ms CPU/msg",
                    file=sys.stderr,
                    flush=True,
                )
    if not args.keep:
        shutil.rmtree(work / f"round{n}", ignore_errors=True)
    return cells


def etc_postfix_digest() -> str:
    h = hashlib.sha256()
    base = Path("/etc/postfix")
    if base.is_dir():
        for path in sorted(base.rglob("*")):
            if path.is_file():
                h.update(str(path).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def git_describe() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "?"


def table(
    args: argparse.Namespace,
    names: list[str],
    value: Callable[[str, int], str],
    heading: str,
) -> list[str]:
    cols = [f"{s} session{'s' if s != 1 else ''}" for s in args.sessions]
    out = [f"| {heading} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        label = LABELS[name].format(v=version())
        if name == "serve" and (args.serve_args or args.serve_command):
            label += f" `{args.serve_args or ' '.join(args.serve_command)}`"
        out.append(f"| {label} | " + " | ".join(value(name, s) for s in args.sessions) + " |")
    return out


def report(
    args: argparse.Namespace,
    names: list[str],
    results: dict[tuple[str, int], list[Cell]],
    ratios: dict[tuple[str, int], list[float]],
    cpu_ratios: dict[tuple[str, int], list[float]],
    took: float,
) -> str:
    med = statistics.median

    def rate(name: str, s: int) -> str:
        text = f"{med(c.rate for c in results[name, s]):.0f}/s"
        if ratios.get((name, s)) and name not in ("postfix", "sink", "postfix-plain"):
            text += f" ({med(ratios[name, s]):.2f}×)"
        return text

    def cpu(name: str, s: int) -> str:
        text = f"{med(c.cpu_ms for c in results[name, s]):.2f}"
        if cpu_ratios.get((name, s)) and name not in ("postfix", "sink", "postfix-plain"):
            text += f" ({med(cpu_ratios[name, s]):.2f}×)"
        return text

    per_cell = f"{args.messages} messages" if args.messages else f"~{args.seconds:g} s"
    checked = sum(
        c.messages for (name, _), cells in results.items() for c in cells if name != "sink"
    )
    jail = "chroot + nobody" if os.geteuid() == 0 else "jail off"
    lines = [
        f"Intake bench, {time.strftime('%Y-%m-%d')}, smapq {git_describe()}, "
        f"{os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}",
        f"smtp-source, {args.size}-byte bodies, 1 recipient, a new connection per message; "
        f"{per_cell} per cell; "
        f"median of {args.rounds} round(s), targets interleaved; smap {jail}; "
        f"{checked} measured messages counted in the spools; run took {took / 60:.1f} min; "
        f"load average {args.load_before:.1f} when it started.",
        "",
    ]
    if args.load != "smtp-source":
        with_tls = " with STARTTLS" if args.tls else " without TLS"
        lines[1] = lines[1].replace("smtp-source", args.generator.name + with_tls, 1)
        if args.resume:
            lines[1] += " Clients offer their previous TLS session (--resume)."
    ratio_note = " (ratio to Postfix, same round)" if "postfix" in names else ""
    if args.tls:
        ratio_note = " (ratio to Postfix with TLS; -plain rows to Postfix without)"
    lines += table(args, names, rate, f"messages/s{ratio_note}")
    lines += ["", *table(args, [n for n in names if n != "sink"], cpu, "server CPU ms/message")]
    if args.load != "smtp-source":
        lines += ["", *tls_tables(args, names, results)]
    if args.skipped:
        lines += ["", "Not measured: " + "; ".join(args.skipped) + "."]
    return "\n".join(lines)


def tls_tables(
    args: argparse.Namespace, names: list[str], results: dict[tuple[str, int], list[Cell]]
) -> list[str]:
    """The generator's own CPU, resumed sessions, and the handshake's share of CPU."""
    med = statistics.median

    def client(name: str, s: int) -> str:
        cells = results[name, s]
        text = f"{med(c.client_ms for c in cells):.2f}"
        resumed = sum(c.resumed for c in cells)
        if args.resume:
            text += f" ({100 * resumed / max(1, sum(c.messages for c in cells)):.0f}% resumed)"
        return text

    out = table(args, names, client, "load generator CPU ms/message")
    if not args.tls:
        return out

    def tickets(name: str, s: int) -> str:
        cells = results[name, s]
        if name in PLAIN_TARGETS or min(c.tickets for c in cells) < 0:
            return "-"
        per = sum(c.tickets for c in cells) / max(1, sum(c.messages for c in cells))
        return f"{per:.2f}"

    out += ["", *table(args, names, tickets, "session tickets sent per connection")]
    negotiated = sorted({c.tls for cells in results.values() for c in cells if c.tls})
    if negotiated:
        out += ["", "Negotiated: " + "; ".join(negotiated) + "."]

    def share(name: str, s: int) -> str:
        plain = results.get((f"{name}-plain", s))
        if not plain:
            return "-"
        with_tls = med(c.cpu_ms for c in results[name, s])
        without = med(c.cpu_ms for c in plain)
        return f"{100 * (with_tls - without) / with_tls:.0f}% ({with_tls - without:.2f} ms)"

    pairs = [n for n in ("serve", "postfix") if n in names and f"{n}-plain" in names]
    if pairs:
        out += ["", *table(args, pairs, share, "TLS handshake's share of server CPU/message")]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n", 2)[2].split("\n\nRun as")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [options]",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3); medians")
    ap.add_argument(
        "--sessions", default="1,4,16", help="parallel sessions, comma-separated (default 1,4,16)"
    )
    ap.add_argument("--only", help=f"targets, comma-separated (default {','.join(TARGETS)})")
    ap.add_argument(
        "--seconds", type=float, default=3.0, help="aim each cell at this long (default 3)"
    )
    ap.add_argument("--messages", type=int, default=0, help="fixed messages per cell instead")
    ap.add_argument("--size", type=int, default=2048, help="body bytes (smtp-source -l)")
    add_rig_options(ap)
    ap.add_argument(
        "--maillog", action="store_true", help="Postfix log to DIR/maillog (costs CPU)"
    )
    ap.add_argument("--no-install", action="store_true", help="never apt-get install postfix")
    ap.add_argument("--tls", action="store_true", help="the STARTTLS rows (see above)")
    ap.add_argument(
        "--resume", action="store_true", help="with --tls: clients resume TLS sessions"
    )
    ap.add_argument(
        "--load",
        choices=("smtp-source", "tls_source", "tls_source.py"),
        help="load generator (default: smtp-source; with --tls: tls_source, the C one)",
    )
    args = ap.parse_args(argv)
    try:
        args.sessions = [int(s) for s in args.sessions.split(",") if s]
    except ValueError:
        ap.error(f"--sessions: not a list of numbers: {args.sessions!r}")
    args.explicit = args.only is not None
    args.skipped = []
    args.only = [t.strip() for t in (args.only or ",".join(TARGETS)).split(",") if t.strip()]
    unknown = set(args.only) - set(TARGETS)
    if unknown:
        ap.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}")
    if args.load is None:
        args.load = "tls_source" if args.tls else "smtp-source"
    if args.tls and args.load == "smtp-source":
        ap.error("--tls: smtp-source has no TLS; use --load tls_source")
    if args.rounds < 1 or not args.sessions or min(args.sessions) < 1 or args.messages < 0:
        ap.error("--rounds, --sessions and --messages must be positive")
    return args


def prepare(args: argparse.Namespace, work: Path) -> list[str]:
    """The targets to run; installs postfix if needed; RigError if one cannot run."""
    if os.geteuid() != 0:
        raise RigError("run as root: Postfix's master and smap's jail need it")
    if not os.access(SMTP_SOURCE, os.X_OK):
        if args.no_install:
            raise RigError(
                "smtp-source is missing: apt-get install postfix (or drop --no-install)"
            )
        print("installing Debian's postfix (smtp-source, smtp-sink) ...", file=sys.stderr)
        install()
    default = TLS_TARGETS if args.tls else tuple(t for t in TARGETS if t not in PLAIN_TARGETS)
    names = [t for t in TARGETS if t in args.only and (args.explicit or t in default)]
    if args.tls and "sink" in names:
        raise RigError("smtp-sink has no TLS: leave 'sink' out of --only with --tls")
    if args.tls:
        args.certs = make_certs(work / "certs")
    if args.load != "smtp-source":
        args.generator = Generator(work / "generator", python_only=args.load == "tls_source.py")
        print(f"load generator: {args.generator.name}", file=sys.stderr)
    if "serve" in names and not args.serve_command and not serve_available():
        if args.explicit:
            raise RigError("this install has no 'smapq serve' (is it merged and installed?)")
        print("note: this install has no 'smapq serve'; skipping it", file=sys.stderr)
        names.remove("serve")
        args.skipped.append("smapq serve (not in this install)")
    if not names:
        raise RigError("no target left to run")
    return names


def run(args: argparse.Namespace, names: list[str], work: Path) -> str:
    results: dict[tuple[str, int], list[Cell]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    cpu_ratios: dict[tuple[str, int], list[float]] = {}
    rates: dict[tuple[str, int], float] = {}
    t0 = time.monotonic()
    args.load_before = os.getloadavg()[0]
    for n in range(1, args.rounds + 1):
        k = (n - 1) % len(names)
        cells = one_round(n, names[k:] + names[:k], args, work, results, rates)
        for (name, s), cell in cells.items():
            base = cells.get(("postfix-plain" if name in PLAIN_TARGETS else "postfix", s))
            if base:
                ratios.setdefault((name, s), []).append(cell.rate / base.rate)
                cpu_ratios.setdefault((name, s), []).append(cell.cpu_ms / base.cpu_ms)
    return report(args, names, results, ratios, cpu_ratios, time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = args.keep or Path(tempfile.mkdtemp(prefix="smapq-intake-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    digest = ""
    try:
        names = prepare(args, work)
        digest = etc_postfix_digest()
        print(run(args, names, work))
    except RigError as exc:
        print(f"intake: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("intake: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        if digest and etc_postfix_digest() != digest:
            print("intake: WARNING: /etc/postfix changed during the run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
