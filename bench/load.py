"""Load test: N concurrent SMTP clients for T seconds, every final reply counted.

    /path/venv/bin/python bench/load.py HOST:PORT [--clients 50] [--seconds 60]
    /path/venv/bin/python bench/load.py --rig inetd|serve [--clients 50] [--seconds 60]

Each client loops: connect, EHLO, MAIL, RCPT, DATA with a small body, QUIT -- one
message per connection (``--per-connection K`` sends K).  Every message attempt ends in
exactly one outcome: the 250 after its final dot, the first reply that refused it
(banner, EHLO, MAIL, RCPT, DATA or the final dot; counted by code and enhanced code,
e.g. ``451 4.3.0 after dot``) or a connection failure (refused, reset, closed, timed
out).  Prints messages/s, latency percentiles and the tempfail count.  Exit status 1 if
any message got a 4xx or 5xx or a connection failed (with --allow-tempfail, 4xx replies
alone do not count), 2 for bad usage.

``--rig inetd|serve`` builds the whole rig first: a spool made by ``smapq init`` (as
root smap chroots into it and runs as nobody), a stand-in sendmail that reads the message
and exits 0, smap under openbsd-inetd or ``smapq serve`` on a random loopback port, and
``smapq deliver --daemon`` running during the load.  Afterwards it checks that every
message acknowledged with 250 is in the database under its queue id (a lost message
fails the run) and reports the deliverer's progress, the receivers' logged errors and
the deliverer's exit status.

Runs on one asyncio loop with plain Protocols (no coroutine per command), so one core
keeps hundreds of clients busy.  The rig is importable: ``run_load()`` and ``Rig`` are
what a test would call.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from benchrig import (
    Deliverer,
    InetdServer,
    RigError,
    ServeServer,
    add_rig_options,
    make_spool,
    serve_available,
    standin_sendmail,
)

STAGES = ("banner", "ehlo", "mail", "rcpt", "data", "dot")
EXPECT = {"banner": 220, "ehlo": 250, "mail": 250, "rcpt": 250, "data": 354, "dot": 250}
ACCEPTED = "250"


def make_body(size: int) -> bytes:
    """A message of about ``size`` bytes: headers and 70-character lines, CRLF."""
    head = b"From: load@example.org\r\nTo: sink@example.net\r\nSubject: load test\r\n\r\n"
    line = b"The quick brown fox jumps over the lazy dog, load-testing the intake.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


class Config:
    """What every client does."""

    def __init__(
        self,
        host: str,
        port: int,
        per_connection: int = 1,
        body_size: int = 1000,
        timeout: float = 60.0,
        helo: str = "load.example",
    ) -> None:
        self.host = host
        self.port = port
        self.per_connection = per_connection
        self.timeout = timeout
        self.ehlo = b"EHLO %s\r\n" % helo.encode()
        self.mail = b"MAIL FROM:<load@example.org>\r\n"
        self.rcpt = b"RCPT TO:<sink@example.net>\r\n"
        self.body = make_body(body_size) + b".\r\n"


class LoadResult:
    """Outcomes of one load run."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()  # "250", "451 4.3.0 after dot", "reset in rcpt"
        self.samples: dict[str, str] = {}  # outcome -> the first reply line seen for it
        self.quit_problems: Counter[str] = Counter()
        self.acked: list[str] = []  # queue ids from "250 ... queued as ID"
        self.latencies: list[float] = []
        self.sessions = 0
        self.elapsed = 0.0

    @property
    def accepted(self) -> int:
        return self.outcomes[ACCEPTED]

    @property
    def attempts(self) -> int:
        return sum(self.outcomes.values())

    def count(self, first: str) -> int:
        return sum(n for k, n in self.outcomes.items() if k[:1] == first and k != ACCEPTED)

    @property
    def tempfails(self) -> int:
        return self.count("4")

    @property
    def permfails(self) -> int:
        return self.count("5")

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if not k[:1].isdigit())

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    def ok(self, allow_tempfail: bool = False) -> bool:
        bad = self.permfails + self.errors + sum(self.quit_problems.values())
        return bad == 0 and (allow_tempfail or self.tempfails == 0)

    def record(self, outcome: str, line: bytes = b"") -> None:
        self.outcomes[outcome] += 1
        if line and outcome not in self.samples:
            self.samples[outcome] = line.decode("utf-8", "replace").strip()

    def summary(self) -> list[str]:
        lat = sorted(self.latencies)

        def pct(p: float) -> str:
            return f"{lat[min(len(lat) - 1, int(p * len(lat)))] * 1000:.0f} ms" if lat else "-"

        lines = [
            f"  elapsed {self.elapsed:.1f} s, {self.sessions} connections, "
            f"{self.attempts} message attempts",
            f"  accepted (250): {self.accepted}   {self.rate:.1f} msgs/s   latency p50 "
            f"{pct(0.5)}, p99 {pct(0.99)}, max {pct(1.0)}",
        ]
        for outcome, n in sorted(self.outcomes.items()):
            if outcome != ACCEPTED:
                sample = self.samples.get(outcome)
                lines.append(f"  {outcome}: {n}" + (f"   e.g. {sample!r}" if sample else ""))
        for problem, n in sorted(self.quit_problems.items()):
            lines.append(f"  after the last message, {problem}: {n}")
        lines.append(
            f"  tempfail (4xx): {self.tempfails}   permanent (5xx): {self.permfails}   "
            f"connection errors: {self.errors}"
        )
        return lines


def _reply_end(buf: bytearray) -> int:
    """End offset of the first complete (multi-line) reply in ``buf``, or -1."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            return -1
        if buf[pos + 3 : pos + 4] != b"-":
            return nl + 1
        pos = nl + 1


def _outcome(reply: bytes, stage: str) -> str:
    """``451 4.3.0 after dot`` from the reply's last line."""
    words = reply.rstrip().rsplit(b"\n", 1)[-1].split()
    code = words[0][:3].decode("ascii", "replace") if words else "???"
    enhanced = words[1].decode("ascii", "replace") if len(words) > 1 else ""
    if not (enhanced[:1] in "245" and enhanced.count(".") == 2):
        enhanced = ""
    return f"{code} {enhanced} after {stage}".replace("  ", " ")


class Session(asyncio.Protocol):
    """One SMTP connection, driven by the replies: a state machine, no coroutine."""

    def __init__(self, cfg: Config, result: LoadResult, deadline: float, start: float) -> None:
        self.cfg = cfg
        self.result = result
        self.deadline = deadline
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.buf = bytearray()
        self.stage = "banner"
        self.left = cfg.per_connection
        self.t_msg = start
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._arm()

    def _arm(self) -> None:
        if self.timer:
            self.timer.cancel()
        self.timer = self.loop.call_later(self.cfg.timeout, self._timed_out)

    def _finish(self) -> None:
        if self.timer:
            self.timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, outcome: str) -> None:
        if self.stage == "quit":
            self.result.quit_problems[outcome.rsplit(" in ", 1)[0] + " before 221"] += 1
        else:
            self.result.record(outcome)
        self._finish()

    def _timed_out(self) -> None:
        if not self.done.done():
            self._fail(f"timeout in {self.stage}")
            if self.transport:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            kind = "closed" if exc is None else _error_name(exc)
            self._fail(f"{kind} in {self.stage}")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.done.done():
            end = _reply_end(self.buf)
            if end < 0:
                return
            reply = bytes(self.buf[:end])
            del self.buf[:end]
            self._arm()
            self._on_reply(reply)

    def _send(self, data: bytes, stage: str) -> None:
        assert self.transport is not None
        self.stage = stage
        self.transport.write(data)

    def _on_reply(self, reply: bytes) -> None:
        code = reply[:3]
        stage = self.stage
        if stage == "quit":
            if code != b"221":
                self.result.quit_problems[_outcome(reply, "QUIT")] += 1
            self._close()
            return
        if code != b"%d" % EXPECT[stage]:
            outcome = _outcome(reply, stage)
            self.result.record(outcome, reply.rstrip().rsplit(b"\n", 1)[-1])
            if code == b"421" or stage == "banner":
                self._close()
            else:
                self._send(b"QUIT\r\n", "quit")
            return
        cfg = self.cfg
        if stage == "banner":
            self._send(cfg.ehlo, "ehlo")
        elif stage == "ehlo":
            self._send(cfg.mail, "mail")
        elif stage == "mail":
            self._send(cfg.rcpt, "rcpt")
        elif stage == "rcpt":
            self._send(b"DATA\r\n", "data")
        elif stage == "data":
            self._send(cfg.body, "dot")
        else:
            self._accepted(reply)

    def _accepted(self, reply: bytes) -> None:
        now = self.loop.time()
        self.result.record(ACCEPTED)
        self.result.latencies.append(now - self.t_msg)
        words = reply.split()
        if b"as" in words and words.index(b"as") + 1 < len(words):  # "queued as ID"
            self.result.acked.append(words[words.index(b"as") + 1].decode("ascii", "replace"))
        self.left -= 1
        if self.left > 0 and now < self.deadline:
            self.t_msg = now
            self._send(self.cfg.mail, "mail")
        else:
            self._send(b"QUIT\r\n", "quit")

    def _close(self) -> None:
        self._finish()
        if self.transport:
            self.transport.close()


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


async def _client(cfg: Config, result: LoadResult, deadline: float) -> float:
    """Sessions back to back until ``deadline``; returns when the last one ended."""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        session = Session(cfg, result, deadline, loop.time())
        result.sessions += 1
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda s=session: s, cfg.host, cfg.port), cfg.timeout
            )
        except (OSError, TimeoutError) as exc:
            result.record(f"{_error_name(exc)} in connect")
            await asyncio.sleep(0.1)  # a refusing server must not make us spin
            continue
        await session.done
    return loop.time()


async def _progress(result: LoadResult, every: float, t0: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        t = loop.time() - t0
        print(
            f"  {t:5.0f} s: {result.accepted} accepted ({result.accepted / t:.0f}/s), "
            f"{result.tempfails} tempfail, {result.permfails} refused, {result.errors} errors",
            file=sys.stderr,
            flush=True,
        )


async def _run(cfg: Config, clients: int, seconds: float, progress: float) -> LoadResult:
    result = LoadResult()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    ticker = asyncio.ensure_future(_progress(result, progress, t0)) if progress > 0 else None
    try:
        ends = await asyncio.gather(*(_client(cfg, result, t0 + seconds) for _ in range(clients)))
    finally:
        if ticker:
            ticker.cancel()
    result.elapsed = max(ends) - t0
    return result


def run_load(
    cfg: Config, clients: int = 50, seconds: float = 60.0, progress: float = 0.0
) -> LoadResult:
    """Run ``clients`` clients for ``seconds`` (sessions in flight then finish)."""
    return asyncio.run(_run(cfg, clients, seconds, progress))


class Rig:
    """A spool, a transport serving it and (optionally) the deliverer, on loopback."""

    def __init__(
        self,
        kind: str,
        workdir: Path,
        deliver: bool = True,
        table_extra: str = "",
        serve_args: list[str] | None = None,
        serve_command: list[str] | None = None,
        inetd_rate: int = 1_000_000,
    ) -> None:
        if kind == "serve" and not serve_command and not serve_available():
            raise RigError("this install has no 'smapq serve' (is it merged and installed?)")
        self.kind = kind
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # the dropped uid walks through it to the spool and sendmail
        sendmail = standin_sendmail(workdir / "bin")
        self.spool = make_spool(workdir / "rig", table_extra, sendmail)
        self.deliverer: Deliverer | None = None
        self.server: InetdServer | ServeServer
        if kind == "inetd":
            self.server = InetdServer(self.spool, workdir / "inetd", inetd_rate)
        else:
            self.server = ServeServer(self.spool, workdir / "serve", serve_args, serve_command)
        try:
            self.deliverer = Deliverer(self.spool, workdir) if deliver else None
        except RigError:
            self.server.stop()
            raise
        self.host = "127.0.0.1"
        self.port = self.server.port

    def check(self, result: LoadResult, drain: float = 0.0) -> list[str]:
        """Stop the rig; problems found (empty: nothing lost); prints what it saw."""
        problems: list[str] = []
        self.server.idle()
        at_end = self.spool.states()
        print(f"  queue at the end of the load: {_states(at_end)}")
        if self.deliverer:
            t0 = time.monotonic()
            while time.monotonic() - t0 < drain and self._waiting():
                time.sleep(0.1)
            if drain:
                print(
                    f"  after up to {drain:.0f} s more: {_states(self.spool.states())} "
                    f"({time.monotonic() - t0:.1f} s)"
                )
            status = self.deliverer.stop()
            log = self.deliverer.log.read_text(errors="replace")
            print(
                f"  deliverer exit status {status}; its log: {len(log.splitlines())} lines, "
                f"{log.count('locked')} mention 'locked', {log.count('Traceback')} tracebacks"
            )
            if status != 0 or "Traceback" in log:
                problems.append(f"deliverer exited {status} (log: {self.deliverer.log})")
        self.server.stop()
        for kind, code, detail, n in self.spool.query(
            "SELECT kind, code, substr(detail, 1, 100), count(*) FROM events"
            " WHERE code >= 400 GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 8"
        ):
            print(f"  receiver event {kind} {code}: {n} x {detail!r}")
        stored = self.spool.queue_ids()
        lost = [q for q in result.acked if q not in stored]
        extra = len(stored) - len(set(result.acked))
        print(
            f"  database: {len(stored)} messages; {len(result.acked)} acknowledged with 250, "
            f"{len(lost)} of them missing; {extra} stored without a 250 the client saw"
        )
        if len(result.acked) != result.accepted:
            problems.append(f"{result.accepted - len(result.acked)} 250 replies had no queue id")
        if lost:
            problems.append(f"LOST: {len(lost)} acknowledged messages missing, e.g. {lost[0]}")
        if extra > result.errors:
            problems.append(f"{extra} messages stored that the client was not told about")
        return problems

    def _waiting(self) -> bool:
        states = self.spool.states()
        return bool(states.get("received", 0) + states.get("delivering", 0))

    def stop(self) -> None:
        """Stop whatever still runs (idempotent)."""
        if self.deliverer:
            self.deliverer.stop()
        self.server.stop()


def _states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "empty"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n", 1)[1].split("\n\nRuns on")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s (HOST:PORT | --rig inetd|serve) [options]",
    )
    ap.add_argument("target", nargs="?", help="HOST:PORT to load ([v6addr]:PORT for IPv6)")
    ap.add_argument("--rig", choices=["inetd", "serve"], help="build a rig and load it")
    ap.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    ap.add_argument("--seconds", type=float, default=60, help="duration (default 60)")
    ap.add_argument(
        "--per-connection", type=int, default=1, help="messages per connection (default 1)"
    )
    ap.add_argument("--body-size", type=int, default=1000, help="message bytes (default 1000)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for each reply")
    ap.add_argument(
        "--allow-tempfail", action="store_true", help="4xx replies do not fail the run"
    )
    ap.add_argument("--progress", type=float, default=10, help="progress line every S s (0: off)")
    rig = ap.add_argument_group("--rig options")
    rig.add_argument("--no-deliver", action="store_true", help="do not run smapq deliver --daemon")
    rig.add_argument(
        "--drain", type=float, default=10, help="seconds the deliverer may catch up after"
    )
    add_rig_options(rig)
    args = ap.parse_args(argv)
    if bool(args.target) == bool(args.rig):
        ap.error("give either HOST:PORT or --rig inetd|serve")
    if args.clients < 1 or args.seconds <= 0 or args.per_connection < 1:
        ap.error("--clients, --seconds and --per-connection must be positive")
    if args.target:
        host, _, port = args.target.rpartition(":")
        if not host or not port.isdigit():
            ap.error(f"target {args.target!r} is not HOST:PORT")
        args.host, args.port = host.strip("[]"), int(port)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = rig = None
    problems: list[str] = []
    try:
        if args.rig:
            work = args.keep or Path(tempfile.mkdtemp(prefix="smapq-load-"))
            rig = Rig(
                args.rig,
                work,
                deliver=not args.no_deliver,
                table_extra="\n".join(args.table_extra),
                serve_args=shlex.split(args.serve_args),
                serve_command=args.serve_command,
                inetd_rate=args.inetd_rate,
            )
            args.host, args.port = rig.host, rig.port
        cfg = Config(args.host, args.port, args.per_connection, args.body_size, args.timeout)
        what = {"inetd": "smap under openbsd-inetd", "serve": "smapq serve"}.get(args.rig, "")
        if args.rig == "serve" and args.serve_command:
            what = "serve stand-in " + " ".join(args.serve_command)
        if rig and rig.deliverer:
            what += ", smapq deliver --daemon running"
        print(
            f"load: {args.clients} clients x {args.seconds:g} s against {args.host}:{args.port}"
            + (f" ({what})" if what else "")
            + f", {args.per_connection} message(s) per connection, {len(cfg.body) - 3}-byte body",
            flush=True,
        )
        result = run_load(cfg, args.clients, args.seconds, args.progress)
        print("\n".join(result.summary()), flush=True)
        if rig:
            problems = rig.check(result, args.drain)
    except RigError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("load: interrupted", file=sys.stderr)
        return 130
    finally:
        if rig:
            rig.stop()
        if work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for problem in problems:
        print(f"load: {problem}", file=sys.stderr)
    if not result.ok(args.allow_tempfail):
        print(
            f"load: FAILED: {result.tempfails} tempfail, {result.permfails} refused, "
            f"{result.errors + sum(result.quit_problems.values())} connection errors",
            file=sys.stderr,
        )
        return 1
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
