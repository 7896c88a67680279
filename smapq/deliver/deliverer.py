"""The deliverer loop behind ``smapq deliver --once | --daemon`` (FWTK's smapd).

Purpose: claim due messages, hand each to sendmail (``child.py``) in batches of
``maxrcptbatch`` recipients, record every outcome, recover expired leases on every
poll, renew the leases of messages in flight, and stop cleanly on a signal.

Shape: the main thread owns the one read-write database connection and does every
transaction (claim, lease renewal, per-batch ``sent_at``, outcome); up to
``maxchildren`` worker threads only run sendmail and report back through a queue.
So the DB work for one message overlaps the sendmail run of the next, and there is
exactly one writer per deliverer process. A claim takes up to ``maxchildren`` more
messages than can run at once (prefetch), so a worker never waits for a claim.

Security: runs as smapd's user (privilege.py drops before this starts). Everything
read from a row is untrusted network data: envelope addresses are checked before they
become argv (command.py), the message goes only to sendmail's stdin.

Crash safety (see smapq/store/states.py): a claim is one transaction; each outcome is
one fenced transaction with its event; a batch sendmail accepted is committed before
the next batch runs. A deliverer killed at any point leaves rows in ``delivering``
whose lease expires and which the next poll (of any deliverer) puts back to
``received``: at-least-once, never lost.

Signals: SIGTERM/SIGINT stop claiming, release prefetched rows at once, let running
sendmails finish (each bounded by ``sendmailtimeout``) and return; a second
SIGTERM/SIGINT kills the running sendmails and releases their rows (back to
``received``, due now, the attempt not counted). SIGHUP re-reads the table.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy import Connection, Engine

from smapq.config.settings import SmapdSettings
from smapq.deliver import baddir, child, command, policy
from smapq.deliver.waker import PollWaker, SqliteWaker
from smapq.store import queries, states

TICK = 0.01  # main loop granularity: how quickly new mail and finished children are seen
CLAIM_MAX = 256  # rows per claim transaction

# Verdicts a worker reports (the message's fate after this run).
SENT = "sent"  # a non-final batch was accepted; commit sent_at, then go on
RELEASE = "release"  # aborted at shutdown: back to received, attempt not counted
CRASHED = "crashed"  # a bug in the worker: leave the row to lease expiry


class Job:
    """One claimed message on its way through a worker."""

    __slots__ = (
        "abort",
        "ack",
        "ack_ok",
        "attempts",
        "data",
        "id",
        "mail_from",
        "queue_id",
        "rcpts",
        "received_at",
        "settings",
        "started",
        "token",
    )

    def __init__(self, row: Any, rcpts: list[tuple[int, str]], settings: SmapdSettings) -> None:
        self.id = int(row.id)
        self.queue_id = str(row.queue_id)
        self.mail_from = str(row.mail_from)
        self.received_at = float(row.received_at)
        self.attempts = int(row.attempts)
        self.token = int(row.lease_token)
        trace = (row.trace or "").encode("utf-8", "surrogateescape")
        self.data: bytes | None = None if row.body is None else trace + bytes(row.body)
        self.rcpts = rcpts
        self.settings = settings
        self.abort = threading.Event()
        self.ack = threading.Event()
        self.ack_ok = False
        self.started: list[float] = []


class Verdict:
    """What a worker reports: the kind, the exit code, a text, the recipients concerned."""

    __slots__ = ("code", "kind", "rcpt_ids", "text")

    def __init__(
        self, kind: str, text: str, code: int | None = None, rcpt_ids: list[int] | None = None
    ) -> None:
        self.kind = kind
        self.text = text
        self.code = code
        self.rcpt_ids = rcpt_ids or []


class Tally:
    """Outcomes of one run (``--once`` turns them into its exit code)."""

    __slots__ = ("bad", "deferred", "delivered", "lost", "released")

    def __init__(self) -> None:
        self.delivered = 0
        self.deferred = 0
        self.bad = 0
        self.lost = 0
        self.released = 0

    def count(self, kind: str) -> None:
        name = {policy.RETRY: "deferred", RELEASE: "released", CRASHED: "lost"}.get(kind, kind)
        setattr(self, name, getattr(self, name) + 1)

    def __str__(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """Python-level handler: nothing to do, the wakeup pipe carries the signal."""


def new_owner() -> str:
    """A lease owner name unique to this process: host, pid and some randomness."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{os.urandom(4).hex()}"


class Deliverer:
    """Claim, deliver, record; ``run()`` returns when done (--once) or stopped."""

    def __init__(
        self,
        settings: SmapdSettings,
        engine: Engine,
        waker: SqliteWaker | PollWaker,
        log: logging.Logger,
        once: bool = False,
        reload: Callable[[], SmapdSettings] | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.waker = waker
        self.log = log
        self.once = once
        self.reload = reload
        self.owner = owner or new_owner()
        self.tally = Tally()
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[Job, Verdict]] = queue.SimpleQueue()
        self.inflight: dict[int, Job] = {}
        self.workers: list[threading.Thread] = []
        self.stop_requests = 0
        self.stops_seen = 0
        self.hup = False
        self._conn: Connection | None = None
        self._sigpipe: tuple[int, int] | None = None
        self._old_wakeup = -1

    # --- signals -----------------------------------------------------------------

    # Signals are read from a self-pipe (signal.set_wakeup_fd), not acted on in Python
    # handlers: CPython runs handlers only in the main thread, and a signal the kernel
    # hands to a worker thread can sit unnoticed while the main thread waits (seen as a
    # lost SIGTERM under load). The C-level handler writes the signal number to the
    # pipe at once, whichever thread took it; the loop reads the pipe every tick.

    def _install_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._sigpipe = (read_fd, write_fd)
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        old: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            old[signum] = signal.signal(signum, _noted)
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if self._sigpipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._sigpipe:
                os.close(fd)
            self._sigpipe = None

    def _poll_signals(self) -> None:
        if self._sigpipe is None:
            return
        try:
            got = os.read(self._sigpipe[0], 512)
        except BlockingIOError:
            return
        for signum in got:
            if signum == signal.SIGHUP:
                self.hup = True
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_requests += 1

    # --- the loop ----------------------------------------------------------------

    @property
    def conn(self) -> Connection:
        assert self._conn is not None
        return self._conn

    def run(self) -> Tally:
        old = self._install_signals()
        self._conn = self.engine.connect()
        try:
            self._loop()
        finally:
            for _ in self.workers:
                self.jobs.put(None)
            for worker in self.workers:
                worker.join()
            self._conn.close()
            self._restore_signals(old)
        return self.tally

    def _loop(self) -> None:
        next_scan = 0.0
        next_beat = time.time() + self.settings.lease / 3
        kicked = True
        while True:
            kicked |= self._drain_results()
            self._poll_signals()
            if self.hup:
                self.hup = False
                self._reload()
            if self.stop_requests:
                self._stopping()
                if not self.inflight:
                    return
            else:
                now = time.time()
                capacity = 2 * self.settings.maxchildren - len(self.inflight)
                if capacity > 0 and (kicked or now >= next_scan or self.waker.changed()):
                    kicked = False
                    got = self._claim(min(capacity, CLAIM_MAX), now)
                    if got == capacity:
                        next_scan = now  # there may be more due right now
                    elif self.once:
                        if not self.inflight:
                            return
                        next_scan = now + self.settings.wakeup
                    else:
                        next_scan = self._next_scan(now)
            now = time.time()
            if self.inflight and now >= next_beat:
                self._heartbeat(now)
                next_beat = now + self.settings.lease / 3
            elif not self.inflight:
                next_beat = now + self.settings.lease / 3
            kicked |= self._wait(TICK)

    def _wait(self, timeout: float) -> bool:
        """Sleep until a worker reports or ``timeout``; True if a slot was freed."""
        try:
            job, verdict = self.results.get(timeout=timeout)
        except queue.Empty:
            return False
        return self._record(job, verdict)

    def _drain_results(self) -> bool:
        """Record every verdict waiting; True if a slot was freed."""
        freed = False
        while True:
            try:
                job, verdict = self.results.get_nowait()
            except queue.Empty:
                return freed
            freed |= self._record(job, verdict)

    def _next_scan(self, now: float) -> float:
        with self.conn.begin():
            due = queries.next_due_at(self.conn)
        later = now + self.settings.wakeup
        return later if due is None else max(now, min(later, due))

    # --- claim, heartbeat --------------------------------------------------------

    def _claim(self, limit: int, now: float) -> int:
        settings = self.settings
        with self.conn.begin():
            for row in queries.recover_expired(self.conn, now):
                self.log.warning("%s: lease of %s expired, back to the queue", *row[1:3])
            rows = queries.claim(self.conn, self.owner, now, settings.lease, limit)
            rcpts: dict[int, list[tuple[int, str]]] = {int(r.id): [] for r in rows}
            for r in queries.unsent_recipients(self.conn, list(rcpts)):
                rcpts[int(r.message_id)].append((int(r.id), str(r.address)))
        for row in rows:
            job = Job(row, rcpts[int(row.id)], settings)
            self.inflight[job.id] = job
            self._ensure_workers()
            self.jobs.put(job)
        return len(rows)

    def _ensure_workers(self) -> None:
        while len(self.workers) < min(self.settings.maxchildren, len(self.inflight)):
            worker = threading.Thread(
                target=self._worker, name=f"smapd-worker-{len(self.workers)}", daemon=True
            )
            worker.start()
            self.workers.append(worker)

    def _heartbeat(self, now: float) -> None:
        ids = list(self.inflight)
        with self.conn.begin():
            kept = queries.renew_leases(self.conn, self.owner, ids, now + self.settings.lease)
        for lost in set(ids) - kept:
            self.log.warning(
                "%s: lease lost (expired or taken over); its outcome will be discarded",
                self.inflight[lost].queue_id,
            )

    # --- stop, reload ------------------------------------------------------------

    def _stopping(self) -> None:
        # Release what no worker has started yet; abort running children on a 2nd signal.
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                continue
            self._record(job, Verdict(RELEASE, "released at shutdown before it started"))
        if self.stop_requests != self.stops_seen:
            self.stops_seen = self.stop_requests
            if self.stop_requests == 1 and self.inflight:
                self.log.info(
                    "stopping: letting %d running sendmail(s) finish; signal again to abort",
                    len(self.inflight),
                )
            elif self.stop_requests > 1:
                self.log.info("aborting %d running sendmail(s)", len(self.inflight))
                for job in self.inflight.values():
                    job.abort.set()

    def _reload(self) -> None:
        if self.reload is None:
            return
        try:
            fresh = self.reload()
        except Exception as exc:
            self.log.error("SIGHUP: table not re-read, keeping the current settings: %s", exc)
            return
        for name in ("userid", "groupid", "database", "directory"):
            if getattr(fresh, name) != getattr(self.settings, name):
                self.log.warning("SIGHUP: %s changed; it takes effect at restart", name)
        self.settings = fresh
        self.log.info("SIGHUP: table re-read")

    # --- workers: run sendmail, no database --------------------------------------

    def _worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                verdict = self._deliver(job)
            except Exception as exc:
                self.log.exception("%s: delivery crashed", job.queue_id)
                verdict = Verdict(CRASHED, f"delivery crashed: {exc!r}")
            self.results.put((job, verdict))

    def _deliver(self, job: Job) -> Verdict:
        s = job.settings
        addresses = [a for _, a in job.rcpts]
        try:
            sender = command.sender_arg(job.mail_from)
            command.check_recipients(addresses)
        except command.Refused as exc:
            return Verdict(policy.BAD, f"refused: {exc}", rcpt_ids=[i for i, _ in job.rcpts])
        if not job.rcpts:
            # Every batch was accepted before a crash cut the last outcome short.
            return Verdict(policy.DELIVERED, "all recipients were already sent", 0)
        if job.data is None:
            return Verdict(policy.BAD, "message body missing from the queue")
        problem = policy.exec_problem(s.sendmail)
        if problem:
            return Verdict(policy.RETRY, problem, rcpt_ids=[i for i, _ in job.rcpts])
        spans = list(command.batches(job.rcpts, s.maxrcptbatch))
        for n, span in enumerate(spans):
            batch = [job.rcpts[i] for i in span]
            argv = command.argv(s.sendmail, sender, [a for _, a in batch])
            result = child.run(
                argv, job.data, s.sendmailtimeout, s.outputmax, job.abort, job.started
            )
            kind = policy.classify(result, s.retrycodes)
            text = result.describe()
            ids = [i for i, _ in batch]
            if kind == policy.DELIVERED and n + 1 < len(spans):
                job.ack.clear()
                self.results.put((job, Verdict(SENT, text, 0, ids)))
                job.ack.wait()
                if not job.ack_ok:
                    return Verdict(CRASHED, "lease lost between batches")
                continue
            if kind != policy.DELIVERED and job.abort.is_set():
                return Verdict(RELEASE, f"released at shutdown: {text}")
            rest = [i for i, _ in job.rcpts[span.start :]]
            return Verdict(kind, text, result.status, ids if kind == policy.DELIVERED else rest)
        raise AssertionError("unreachable: a message with recipients has a batch")

    # --- outcomes: one transaction each ------------------------------------------

    def _record(self, job: Job, verdict: Verdict) -> bool:
        """Commit one verdict; True if the job is finished (its slot is free)."""
        if verdict.kind == SENT:
            job.ack_ok = self._mark_sent(job, verdict)
            job.ack.set()
            return False
        self.inflight.pop(job.id, None)
        if verdict.kind == CRASHED:
            self.tally.count(CRASHED)
            return True
        now = time.time()
        kind = verdict.kind
        if kind == policy.RETRY:
            kind, committed = self._retry(job, verdict, now)
        elif kind == RELEASE:
            committed = self._finish(job, "recovered", {"state": states.RECEIVED}, now, verdict)
        elif kind == policy.DELIVERED:
            committed = self._delivered(job, verdict, now)
        else:
            committed = self._bad(job, verdict, now, verdict.text)
        if not committed:
            self.log.warning(
                "%s: lease lost, outcome %s (%s) discarded", job.queue_id, kind, verdict.text
            )
            self.tally.count(CRASHED)
            return True
        self.tally.count(kind)
        self._log_outcome(job, kind, verdict)
        if kind == policy.BAD:
            self._export(job, verdict.text)
        return True

    def _finish(
        self, job: Job, event: str, values: dict[str, Any], now: float, verdict: Verdict
    ) -> bool:
        with self.conn.begin():
            return queries.finish(
                self.conn, job.id, job.token, job.queue_id, event, values, now,
                verdict.code, verdict.text,
            )  # fmt: skip

    def _mark_sent(self, job: Job, verdict: Verdict) -> bool:
        with self.conn.begin():
            return queries.mark_sent(
                self.conn, job.id, job.token, verdict.rcpt_ids, time.time(), verdict.text
            )

    def _delivered(self, job: Job, verdict: Verdict, now: float) -> bool:
        values = {"state": states.DELIVERED, "attempts": job.attempts + 1, "delivered_at": now}
        with self.conn.begin() as txn:
            if verdict.rcpt_ids:
                queries.mark_sent(
                    self.conn, job.id, job.token, verdict.rcpt_ids, now, verdict.text
                )
            done = queries.finish(
                self.conn, job.id, job.token, job.queue_id, policy.DELIVERED, values, now,
                verdict.code, verdict.text,
            )  # fmt: skip
            if not done:
                txn.rollback()
            return done

    def _retry(self, job: Job, verdict: Verdict, now: float) -> tuple[str, bool]:
        s = job.settings
        attempts = job.attempts + 1
        when = policy.next_attempt(
            now, job.received_at, attempts, s.minbackoff, s.maxbackoff, s.maxqueuetime
        )
        if when is None:
            age = int(now - job.received_at)
            reason = f"gave up after {attempts} attempts in {age}s: {verdict.text}"
            return policy.BAD, self._bad(job, verdict, now, reason)
        values = {"state": states.RECEIVED, "attempts": attempts, "next_attempt_at": when}
        with self.conn.begin():
            queries.note_recipients(self.conn, verdict.rcpt_ids, verdict.text)
            done = queries.finish(
                self.conn, job.id, job.token, job.queue_id, "deferred", values, now,
                verdict.code, f"{verdict.text}; next try in {int(when - now)}s",
            )  # fmt: skip
        return policy.RETRY, done

    def _bad(self, job: Job, verdict: Verdict, now: float, reason: str) -> bool:
        values = {"state": states.BAD, "attempts": job.attempts + 1}
        with self.conn.begin():
            queries.note_recipients(self.conn, verdict.rcpt_ids, reason)
            return queries.finish(
                self.conn, job.id, job.token, job.queue_id, policy.BAD, values, now,
                verdict.code, reason,
            )  # fmt: skip

    def _export(self, job: Job, reason: str) -> None:
        directory = job.settings.baddir
        if not directory:
            return
        with self.conn.begin():
            row = queries.message_by_queue_id(self.conn, job.queue_id)
            rcpts = queries.recipients_of(self.conn, job.id) if row is not None else []
        if row is None:
            return
        trace = (row.trace or "").encode("utf-8", "surrogateescape")
        try:
            path = baddir.export(
                directory, job.queue_id, trace + bytes(row.body or b""),
                row.mail_from, [r.address for r in rcpts], reason, int(row.attempts),
            )  # fmt: skip
        except OSError as exc:
            self.log.error("%s: cannot export to baddir %s: %s", job.queue_id, directory, exc)
            return
        with self.conn.begin():
            queries.add_event(self.conn, "exported", queue_id=job.queue_id, detail=path)

    def _log_outcome(self, job: Job, kind: str, verdict: Verdict) -> None:
        level = logging.INFO if kind == policy.DELIVERED else logging.WARNING
        self.log.log(
            level,
            "%s: from=<%s> nrcpt=%d status=%s attempts=%d %s",
            job.queue_id,
            job.mail_from,
            len(job.rcpts),
            kind if kind != policy.RETRY else "deferred",
            job.attempts + (0 if kind == RELEASE else 1),
            verdict.text,
        )
