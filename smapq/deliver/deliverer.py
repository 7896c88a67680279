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
``received``: at-least-once, never lost. A deliverer that merely stalled past its
leases (SIGSTOP, swapping) does not recover its own rows -- their sendmails may still
run -- but renews them; another deliverer may have taken them meanwhile, and then the
lease token fences the stale outcome off. Jobs are keyed by (id, token) for that.

Exit: whatever way ``run()`` ends, a deliverer never leaves a row it holds in
``delivering``: unstarted jobs are released, running sendmails are aborted (on an
error exit) or have finished (a normal one), their outcomes are committed, and a last
statement releases any row still under this deliverer's name (back to ``received``,
due now, the attempt not counted, a ``recovered`` event). Only if the database itself
is unreachable is that left to lease expiry.

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
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from smapq.config.settings import SmapdSettings
from smapq.deliver import baddir, child, command, policy
from smapq.deliver.waker import PollWaker, SqliteWaker
from smapq.store import queries, states

MAX_DB_FAILURES = 10  # database errors in a row before the deliverer gives up
TICK = 0.01  # main loop granularity: how quickly new mail and finished children are seen
CLAIM_MAX = 256  # rows per claim transaction
PREFETCH = 32  # claimed beyond maxchildren (refilled at half), so workers never wait
FLUSH_DELAY = 0.02  # outcomes wait at most this long for a shared commit
FLUSH_MAX = 64  # ... or until this many are waiting
SWITCH_INTERVAL = 0.0005  # seconds a busy thread keeps the GIL from a waiting one

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# Verdicts a worker reports (the message's fate after this run).
SENT = "sent"  # a non-final batch was accepted; commit sent_at, then go on
RELEASE = "release"  # aborted at shutdown: back to received, attempt not counted
CRASHED = "crashed"  # tally only: an outcome fenced off because the lease was lost


class Job:
    """One claimed message on its way through a worker."""

    __slots__ = (
        "abort",
        "ack",
        "ack_ok",
        "attempts",
        "data",
        "id",
        "key",
        "mail_from",
        "next_attempt_at",
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
        self.next_attempt_at = float(row.next_attempt_at)
        self.token = int(row.lease_token)
        self.key = (self.id, self.token)
        trace = (row.trace or "").encode("utf-8", "surrogateescape")
        self.data: bytes | None = None if row.body is None else trace + bytes(row.body)
        self.rcpts = rcpts
        self.settings = settings
        self.abort = threading.Event()
        self.ack = threading.Event()
        self.ack_ok = False
        self.started: list[float] = []

    def values(
        self,
        state: str,
        attempts: int,
        next_attempt_at: float | None = None,
        delivered_at: float | None = None,
    ) -> dict[str, Any]:
        """The message columns an outcome writes (queries.FINISH_COLUMNS)."""
        return {
            "state": state,
            "attempts": attempts,
            "next_attempt_at": next_attempt_at or self.next_attempt_at,
            "delivered_at": delivered_at,
        }


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


class _LoopState:
    """What the loop carries from one pass to the next."""

    __slots__ = ("kicked", "next_beat", "next_scan")

    def __init__(self, next_beat: float) -> None:
        self.kicked = True  # look for due mail at once
        self.next_scan = 0.0
        self.next_beat = next_beat


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
        # Keyed by (id, lease token): after a stall another deliverer may recover a row
        # and this one claim it again while the stale job's sendmail still runs.
        self.inflight: dict[tuple[int, int], Job] = {}
        self.pending: list[tuple[Job, Verdict]] = []
        self.pending_since = 0.0
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
        for signum in HANDLED_SIGNALS:
            old[signum] = signal.signal(signum, _noted)
        # service.run blocked them until now; one that came meanwhile arrives here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
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
        # The workers' path (sendmail exits -> read, reap, report, spawn the next) is
        # the throughput bound; when the main thread is busy in SQLAlchemy a worker
        # waited up to the default 5 ms switch interval for the GIL each time.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            return self._run()
        finally:
            sys.setswitchinterval(interval)

    def _run(self) -> Tally:
        old = self._install_signals()
        self._conn = self.engine.connect()
        queries.deliverer_sync(self._conn)
        try:
            self._loop()
        finally:
            try:
                self._shutdown()
            finally:
                self._conn.close()
                self._restore_signals(old)
        return self.tally

    def _shutdown(self) -> None:
        """Leave nothing in ``delivering``: see "Exit" in the module docstring."""
        # On a normal exit nothing is in flight and this only stops the workers; after
        # an error, unstarted jobs are released and running sendmails aborted (a
        # worker must never go on running jobs nobody will record).
        self._take_back_unstarted()
        for job in self.inflight.values():
            job.abort.set()
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            while worker.is_alive():
                worker.join(TICK)
                self._drain_quietly()
        self._drain_quietly()
        now = time.time()
        try:
            if self.pending:
                self._flush()
            for job in list(self.inflight.values()):  # only after a bug: no verdict came
                self._record(job, Verdict(RELEASE, "released at exit"))
            if self.pending:
                self._flush()
            with self.conn.begin():
                stray = queries.release_owned(self.conn, self.owner, now, "released at exit")
        except DBAPIError as exc:
            self.log.error("at exit: queue database error, leaving rows to lease expiry: %s", exc)
            return
        for row in stray:
            self.log.error("%s: still held at exit; released", row.queue_id)
            self.tally.count(RELEASE)

    def _drain_quietly(self) -> None:
        try:
            self._drain_results()
        except DBAPIError as exc:  # a SENT ack's write failed; its worker was answered
            self.log.error("at exit: queue database error: %s", exc)

    def _take_back_unstarted(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._record(job, Verdict(RELEASE, "released at shutdown before it started"))

    def _loop(self) -> None:
        """Run ``_step`` until done; a database error is retried, not fatal at once.

        "database is locked" past the busy timeout, a PostgreSQL restart: log, back
        off, go on. Outcomes not yet committed stay pending; rows whose leases run out
        meanwhile are recovered by whoever polls next (at-least-once).
        """
        failures = 0
        state = _LoopState(time.time() + self.settings.lease / 3)
        while True:
            try:
                if self._step(state):
                    return
                failures = 0
            except DBAPIError as exc:
                failures += 1
                if failures >= MAX_DB_FAILURES:
                    raise
                self.log.error("queue database error (%d in a row): %s", failures, exc)
                time.sleep(min(5.0, 0.1 * 2**failures))

    def _step(self, st: _LoopState) -> bool:
        """One pass of the loop; True when the deliverer is done."""
        st.kicked |= self._drain_results()
        self._poll_signals()
        if self._flush_due():
            self._flush()
        if self.hup:
            self.hup = False
            self._reload()
        if self.stop_requests:
            self._stopping()
            if self.pending:
                self._flush()
            if not self.inflight:
                return True
        else:
            now = time.time()
            # Claim in batches: when a worker could idle, or when half the prefetch is
            # used up; the prefetched rows' leases are renewed too.
            children = self.settings.maxchildren
            capacity = children + max(children, PREFETCH) - len(self.inflight)
            busy = len(self.inflight) - len(self.pending)
            wanted = busy < children or capacity >= PREFETCH // 2
            if wanted and (st.kicked or now >= st.next_scan or self.waker.changed()):
                st.kicked = False
                got = self._claim(min(capacity, CLAIM_MAX), now)
                if got == capacity:
                    st.next_scan = now  # there may be more due right now
                elif self.once:
                    if not self.inflight:
                        return True
                    st.next_scan = now + self.settings.wakeup
                else:
                    st.next_scan = self._next_scan(now)
        now = time.time()
        if self.inflight and now >= st.next_beat:
            self._heartbeat(now)
            st.next_beat = now + self.settings.lease / 3
        elif not self.inflight:
            st.next_beat = now + self.settings.lease / 3
        timeout = TICK
        if self.pending:
            timeout = min(TICK, max(0.0, self.pending_since + FLUSH_DELAY - time.monotonic()))
        st.kicked |= self._wait(timeout)
        return False

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
            for row in queries.recover_expired(self.conn, now, keep_owner=self.owner):
                self.log.warning("%s: lease of %s expired, back to the queue", *row[1:3])
            rows = queries.claim(self.conn, self.owner, now, settings.lease, limit)
            rcpts: dict[int, list[tuple[int, str]]] = {int(r.id): [] for r in rows}
            for r in queries.unsent_recipients(self.conn, list(rcpts)):
                rcpts[int(r.message_id)].append((int(r.id), str(r.address)))
        for row in rows:
            job = Job(row, rcpts[int(row.id)], settings)
            self.inflight[job.key] = job
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
        # Renews expired leases too, as long as nobody took the row meanwhile: after a
        # stall (SIGSTOP) the sendmail may still be running and the row is still ours.
        ids = sorted({mid for mid, _ in self.inflight})
        with self.conn.begin():
            kept = queries.renew_leases(self.conn, self.owner, ids, now + self.settings.lease)
        for (mid, _), job in self.inflight.items():
            if mid not in kept:
                self.log.warning(
                    "%s: lease lost (expired or taken over); its outcome will be discarded",
                    job.queue_id,
                )

    # --- stop, reload ------------------------------------------------------------

    def _stopping(self) -> None:
        # Release what no worker has started yet; abort running children on a 2nd signal.
        self._take_back_unstarted()
        if self.stop_requests != self.stops_seen:
            self.stops_seen = self.stop_requests
            running = len(self.inflight) - len(self.pending)
            if self.stop_requests == 1 and running:
                self.log.info(
                    "stopping: letting %d running sendmail(s) finish; signal again to abort",
                    running,
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
                # A bug: defer (the attempt counts, so a message that always crashes
                # still ages out), rather than leave the row to lease expiry.
                self.log.exception("%s: delivery crashed", job.queue_id)
                verdict = Verdict(policy.RETRY, f"delivery crashed: {exc!r}")
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
        spans = list(command.batches(job.rcpts, s.maxrcptbatch))
        for n, span in enumerate(spans):
            batch = [job.rcpts[i] for i in span]
            argv = command.argv(s.sendmail, sender, [a for _, a in batch])
            result = child.run(
                argv, job.data, s.sendmailtimeout, s.outputmax, job.abort, job.started
            )
            if result.exec_error is not None:
                # Said plainly ("does not exist", "is not executable") where it can be;
                # checked only on failure, not with three stat calls per message.
                result.exec_error = policy.exec_problem(s.sendmail) or result.exec_error
            kind = policy.classify(result, s.retrycodes)
            text = result.describe()
            ids = [i for i, _ in batch]
            if kind == policy.DELIVERED and n + 1 < len(spans):
                job.ack.clear()
                self.results.put((job, Verdict(SENT, text, 0, ids)))
                job.ack.wait()
                if not job.ack_ok:
                    # Fenced off when recorded; the rest waits for whoever holds it now.
                    return Verdict(policy.RETRY, "lease lost between batches")
                continue
            if kind != policy.DELIVERED and job.abort.is_set():
                return Verdict(RELEASE, f"released at shutdown: {text}")
            rest = [i for i, _ in job.rcpts[span.start :]]
            return Verdict(kind, text, result.status, ids if kind == policy.DELIVERED else rest)
        raise AssertionError("unreachable: a message with recipients has a batch")

    # --- outcomes: group commit ---------------------------------------------------
    # Verdicts are committed in groups: every FLUSH_DELAY, or at FLUSH_MAX verdicts,
    # or at once when stopping. One transaction, several outcomes, each still fenced
    # by its lease token and each with its event; nothing is committed half. Waiting
    # a few milliseconds only widens the at-least-once window (a crash before the
    # commit re-delivers), and it saves a commit per message.

    def _record(self, job: Job, verdict: Verdict) -> bool:
        """Take one verdict; True if its worker is free again."""
        if verdict.kind == SENT:
            job.ack_ok = False
            try:
                job.ack_ok = self._mark_sent(job, verdict)
            finally:
                job.ack.set()  # never leave the worker waiting, even on a DB error
            return False
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append((job, verdict))
        return True

    def _flush_due(self) -> bool:
        if not self.pending:
            return False
        return (
            len(self.pending) >= FLUSH_MAX
            or time.monotonic() - self.pending_since >= FLUSH_DELAY
            or bool(self.stop_requests)
            or (
                len(self.pending) == len(self.inflight)
                and (self.once or len(self.inflight) < self.settings.maxchildren)
            )
        )

    def _flush(self) -> None:
        batch = self.pending
        now = time.time()
        with self.conn.begin():
            held_for = queries.held_seconds(self.conn, _near_deadline(batch, now))
            plans = [
                _plan(job, verdict, now, held_for.get(job.queue_id, 0.0)) for job, verdict in batch
            ]
            held = queries.record_outcomes(
                self.conn,
                now,
                [p.row() for p in plans],
                [(*p.job.key, rid, text) for p in plans for rid, text in p.sent],
                [(*p.job.key, rid, text) for p in plans for rid, text in p.notes],
            )
        self.pending = []  # committed (on an error they stay pending for the next try)
        for p in plans:
            self.inflight.pop(p.job.key, None)
            if p.job.key not in held:
                self.log.warning(
                    "%s: lease lost, outcome %s (%s) discarded", p.job.queue_id, p.kind, p.detail
                )
                self.tally.count(CRASHED)
                continue
            self.tally.count(p.kind)
            self._log_outcome(p)
            if p.kind == policy.BAD:
                self._export(p.job, p.detail)

    def _mark_sent(self, job: Job, verdict: Verdict) -> bool:
        with self.conn.begin():
            return queries.mark_sent(
                self.conn, job.id, job.token, verdict.rcpt_ids, time.time(), verdict.text
            )

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

    def _log_outcome(self, p: Plan) -> None:
        job = p.job
        level = logging.INFO if p.kind == policy.DELIVERED else logging.WARNING
        self.log.log(
            level,
            "%s: from=<%s> nrcpt=%d status=%s attempts=%d %s",
            job.queue_id,
            job.mail_from,
            len(job.rcpts),
            p.event,
            p.values["attempts"],
            p.detail,
        )


class Plan:
    """One verdict turned into the row changes of its outcome."""

    __slots__ = ("code", "detail", "event", "job", "kind", "notes", "sent", "values")

    def __init__(self, job: Job, kind: str, event: str, detail: str, code: int | None) -> None:
        self.job = job
        self.kind = kind
        self.event = event
        self.detail = detail
        self.code = code
        self.values: dict[str, Any] = {}
        self.sent: list[tuple[int, str]] = []
        self.notes: list[tuple[int, str]] = []

    def row(self) -> dict[str, Any]:
        job = self.job
        return {
            "message_id": job.id,
            "token": job.token,
            "queue_id": job.queue_id,
            "event": self.event,
            "code": self.code,
            "detail": self.detail,
            **self.values,
        }


def _near_deadline(batch: list[tuple[Job, Verdict]], now: float) -> list[str]:
    """Queue ids of deferrals whose give-up deadline matters now (see policy)."""
    out = []
    for job, verdict in batch:
        s = job.settings
        if verdict.kind == policy.RETRY and policy.near_deadline(
            now, job.received_at, job.attempts + 1, s.minbackoff, s.maxbackoff, s.maxqueuetime
        ):
            out.append(job.queue_id)
    return out


def _plan(job: Job, verdict: Verdict, now: float, held: float = 0.0) -> Plan:
    """What a verdict does to the message: state, attempts, next try, recipients.

    ``held``: seconds the message spent on hold, which do not count towards
    ``maxqueuetime``.
    """
    kind, text, code = verdict.kind, verdict.text, verdict.code
    if kind == RELEASE:
        p = Plan(job, RELEASE, "recovered", text, code)
        p.values = job.values(states.RECEIVED, job.attempts)
        return p
    attempts = job.attempts + 1
    if kind == policy.DELIVERED:
        p = Plan(job, kind, "delivered", text, code)
        p.values = job.values(states.DELIVERED, attempts, delivered_at=now)
        p.sent = [(rid, text) for rid in verdict.rcpt_ids]
        return p
    if kind == policy.RETRY:
        s = job.settings
        when = policy.next_attempt(
            now, job.received_at, attempts, s.minbackoff, s.maxbackoff, s.maxqueuetime, held
        )
        if when is not None:
            detail = f"{text}; next try in {int(when - now)}s"
            p = Plan(job, kind, "deferred", detail, code)
            p.values = job.values(states.RECEIVED, attempts, next_attempt_at=when)
            p.notes = [(rid, text) for rid in verdict.rcpt_ids]
            return p
        age = f"{int(now - job.received_at)}s" + (f" ({int(held)}s of it held)" if held else "")
        text = f"gave up after {attempts} attempts in {age}: {text}"
    p = Plan(job, policy.BAD, "bad", text, code)
    p.values = job.values(states.BAD, attempts)
    p.notes = [(rid, text) for rid in verdict.rcpt_ids]
    return p
