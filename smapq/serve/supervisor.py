"""The root process of ``smapq serve``: it holds the listening sockets and the workers.

Purpose: like Postfix's master(8), the supervisor does no network I/O and speaks no
SMTP.  It forks ``--workers`` serving processes (smapq.serve.worker), each of which
jails itself; it replaces a worker that dies (with a growing delay when workers die
right after they start, so a broken queue does not become a fork storm); on SIGHUP it
re-reads the netperm-table and, when the table is good, starts a new generation of
workers and lets the old one finish its sessions; on SIGTERM or SIGINT it tells every
worker to stop (they finish their sessions within ``grace`` seconds, then answer
421 4.3.2) and waits for them.

Security: the supervisor stays root, because re-reading the table and forking jailed
workers needs root; that is all it does.  It never touches the queue, and a bad
table on SIGHUP leaves the running workers as they are (the error is logged).

Diagnostics: lines on stderr (the operator's terminal, or the journal under systemd)
and in the log: start, reload, worker exits and replacements, stop.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from smapq.config.settings import load
from smapq.config.tls import server_context
from smapq.errors import ConfigError
from smapq.intake.audit import LOG_ERR, LOG_INFO, LOG_WARNING
from smapq.receive.logsink import LogSink
from smapq.serve.anvil import Anvil
from smapq.serve.listeners import describe
from smapq.serve.worker import run_worker

if TYPE_CHECKING:
    import socket

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
FAST_EXIT = 5.0  # a worker that dies sooner than this after its start "failed to start"
MAX_DELAY = 30.0
KILL_AFTER = 15.0  # seconds past the grace before the supervisor kills stragglers


class WorkerInfo:
    __slots__ = ("generation", "pid", "slot", "started")

    def __init__(self, pid: int, slot: int, generation: int) -> None:
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.started = time.monotonic()


class Supervisor:
    """See the module docstring."""

    def __init__(
        self,
        table: str,
        sockets: list[socket.socket],
        workers: int,
        grace: float,
        loop_kind: str,
    ) -> None:
        self.table = table
        self.sockets = sockets
        self.workers = workers
        self.grace = grace
        self.loop_kind = loop_kind
        self.log = LogSink("smap")
        self.anvil = Anvil(capacity(workers))
        self.free_slots = list(range(self.anvil.workers))
        self.live: dict[int, WorkerInfo] = {}
        self.generation = 0
        self.failures = 0
        self.respawn_at: list[float] = []
        self.stopping_since = 0.0

    def say(self, priority: int, text: str) -> None:
        self.log(priority, text)
        print(f"smapq serve: {text}", file=sys.stderr, flush=True)

    # --- workers ---
    def spawn(self) -> None:
        if not self.free_slots:
            self.say(LOG_WARNING, "no worker slot free (old workers still finishing)")
            self.respawn_at.append(time.monotonic() + 1.0)
            return
        slot = self.free_slots.pop(0)
        self.anvil.clear(slot)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                code = run_worker(
                    self.table, self.sockets, self.anvil, slot, self.grace, self.loop_kind
                )
            finally:
                os._exit(code)
        self.live[pid] = WorkerInfo(pid, slot, self.generation)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            info = self.live.pop(pid, None)
            if info is None:
                continue
            self.anvil.clear(info.slot)
            self.free_slots.append(info.slot)
            self._exited(info, status)

    def _exited(self, info: WorkerInfo, status: int) -> None:
        if os.WIFSIGNALED(status):
            how = f"killed by signal {os.WTERMSIG(status)}"
        else:
            how = f"exit status {os.waitstatus_to_exitcode(status)}"
        expected = self.stopping_since or info.generation != self.generation
        if expected and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self.log(LOG_INFO, f"worker {info.pid} finished")
            return
        if expected:
            self.say(LOG_WARNING, f"worker {info.pid} ended: {how}")
            return
        lived = time.monotonic() - info.started
        self.failures = self.failures + 1 if lived < FAST_EXIT else 0
        delay = min(MAX_DELAY, 2.0 ** (self.failures - 1)) if self.failures else 0.0
        self.say(LOG_ERR, f"worker {info.pid} {how} after {lived:.1f}s; replaced in {delay:.0f}s")
        self.respawn_at.append(time.monotonic() + delay)

    def signal_all(self, sig: int, generation: int | None = None) -> None:
        for info in self.live.values():
            if generation is None or info.generation == generation:
                try:  # noqa: SIM105
                    os.kill(info.pid, sig)
                except ProcessLookupError:
                    pass

    # --- signals ---
    def reload(self) -> None:
        try:
            smap = load(self.table).smap
            if smap.tlscert:
                server_context(smap)
        except ConfigError as exc:
            self.say(LOG_ERR, f"reload refused, workers keep the old table: fwtkcfgerr: {exc}")
            return
        old = self.generation
        self.generation += 1
        self.respawn_at.clear()
        self.failures = 0
        for _ in range(self.workers):
            self.spawn()
        self.signal_all(signal.SIGTERM, old)
        self.say(LOG_INFO, f"reloaded {self.table}: generation {self.generation}")

    def stop(self) -> None:
        if not self.stopping_since:
            self.stopping_since = time.monotonic()
            self.say(LOG_INFO, f"stopping: sessions have {self.grace:.0f}s to finish")
            self.respawn_at.clear()
            # No new connections from now on: refused at once, not left in a backlog
            # that no worker accepts from any more.
            for sock in self.sockets:
                sock.close()
        self.signal_all(signal.SIGTERM)

    # --- main loop ---
    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        where = ", ".join(describe(s) for s in self.sockets)
        self.say(LOG_INFO, f"listening on {where} with {self.workers} workers (pid {os.getpid()})")
        for _ in range(self.workers):
            self.spawn()
        while self.live or not self.stopping_since:
            info = signal.sigtimedwait(_SIGNALS, 0.5)
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self.stop()
                elif info.si_signo == signal.SIGHUP and not self.stopping_since:
                    self.reload()
            self.reap()
            now = time.monotonic()
            due = [t for t in self.respawn_at if t <= now]
            if due and not self.stopping_since:
                self.respawn_at = [t for t in self.respawn_at if t > now]
                for _ in due:
                    self.spawn()
            if self.stopping_since and now > self.stopping_since + self.grace + KILL_AFTER:
                self.signal_all(signal.SIGKILL)
        for sock in self.sockets:
            sock.close()
        self.say(LOG_INFO, "stopped")
        return 0


def capacity(workers: int) -> int:
    """Worker slots in the anvil: the running generation plus old ones still finishing."""
    return min(64, max(8, 4 * workers))
