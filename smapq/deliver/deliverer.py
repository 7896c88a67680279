"""The deliverer loop behind ``smapq deliver --once | --daemon`` (FWTK's smapd).

Purpose: the scheduler that ties the parts together -- claims and heartbeats
(leases.py), sendmail runs (workers.py), group commit of outcomes (outcomes.py),
baddir export (baddir.py), retention (retention.py), signals (signals.py) -- and the
fault policy for the queue database.

Shape: the main thread owns the one read-write database connection and does every
transaction; up to ``maxchildren`` worker threads only run sendmail and report back
through a queue. So the DB work for one message overlaps the sendmail run of the
next, and there is exactly one writer per deliverer process. A claim takes up to
``maxchildren`` more messages than can run at once (prefetch), so a worker never
waits for a claim.

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

Faults: a database error never ends the daemon. It is logged with what it means
(store/faults.py), the loop backs off (up to BACKOFF_MAX, a stop request cuts the
wait short) and tries again; outcomes not yet committed stay pending, and nothing new
is claimed while they cannot be written (each pass commits before it claims). A full
disk also makes a checkpoint due before the next claim, so the WAL can start over in
the space it already holds.
Damage is noted beside the database (store/damage.py) and the claims go careful
(leases.py). ``--once`` gives up after a few failures in a row (``Stopped``: one line,
exit 75, or 74 for damage) -- having released what it holds.

Exit: whatever way ``run()`` ends, a deliverer never leaves a row it holds in
``delivering``: unstarted jobs are released, running sendmails are aborted (on an
error exit) or have finished (a normal one), their outcomes are committed, and a last
statement releases any row still under this deliverer's name (back to ``received``,
due now, the attempt not counted, a ``recovered`` event). Only if the database itself
cannot be written is that left to lease expiry.

Signals: SIGTERM/SIGINT stop claiming, release prefetched rows at once, let running
sendmails finish (each bounded by ``sendmailtimeout``) and return; a second
SIGTERM/SIGINT kills the running sendmails and releases their rows (back to
``received``, due now, the attempt not counted). SIGHUP re-reads the table.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from smapq.config.settings import SmapdSettings
from smapq.deliver import baddir, policy
from smapq.deliver.inbox import Inbox
from smapq.deliver.jobs import RELEASE, Job, Tally, Verdict, new_owner
from smapq.deliver.leases import Leases
from smapq.deliver.outcomes import Plan, Recorder
from smapq.deliver.retention import Retention
from smapq.deliver.signals import HANDLED, SignalPipe
from smapq.deliver.waker import Waker
from smapq.deliver.workers import Workers
from smapq.errors import EX_IOERR, EX_TEMPFAIL, SmapqError
from smapq.store import damage, faults, queries

__all__ = ["HANDLED", "Deliverer", "Stopped", "Tally"]

TICK = 0.01  # main loop granularity: how quickly new mail and finished children are seen
CLAIM_MAX = 256  # rows per claim transaction
PREFETCH = 32  # claimed beyond maxchildren (refilled at half), so workers never wait
SWITCH_INTERVAL = 0.0005  # seconds a busy thread keeps the GIL from a waiting one
BACKOFF_MAX = 30.0  # longest wait between tries of a failing database (daemon)
# --once gives up after this many failures in a row; waiting will not fix these soon.
GIVE_UP_ONCE = {faults.FULL: 4, faults.DAMAGED: 3, faults.READONLY: 2}
GIVE_UP_ONCE_OTHER = 10  # busy, or an error of unknown kind
HINTS = {
    faults.FULL: "waiting for room in the spool",
    faults.DAMAGED: "run 'smapq db verify'",
    faults.READONLY: "see 'smapq check-config'",
}


class Stopped(SmapqError):
    """``--once`` gave up on a database error that kept coming back."""

    def __init__(self, kind: str, text: str) -> None:
        hint = HINTS.get(kind)
        super().__init__(f"{text}; {hint}" if hint else text)
        self.exit_code = EX_IOERR if kind == faults.DAMAGED else EX_TEMPFAIL


class _LoopState:
    """What the loop carries from one pass to the next."""

    __slots__ = ("kicked", "next_beat", "next_scan", "started")

    def __init__(self, next_beat: float) -> None:
        self.kicked = True  # look for due mail at once
        self.next_scan = 0.0
        self.next_beat = next_beat
        self.started = False


class Deliverer:
    """Claim, deliver, record; ``run()`` returns when done (--once) or stopped."""

    def __init__(
        self,
        settings: SmapdSettings,
        engine: Engine,
        waker: Waker,
        log: logging.Logger,
        once: bool = False,
        reload: Callable[[SmapdSettings], SmapdSettings] | None = None,
        owner: str | None = None,
        database: str = "",
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.waker = waker
        self.log = log
        self.once = once
        self.reload = reload
        self.database = database  # file path or URL, for the damage note
        self.owner = owner or new_owner()
        self.tally = Tally()
        self.signals = SignalPipe()
        self.results: Inbox[tuple[Job, Verdict]] = Inbox()
        self.workers = Workers(self.results, log)
        self.leases = Leases(self.owner, log, self.tally, self._damaged)
        self.recorder = Recorder(log, self.tally, self._finished, self._given_up)
        self.retention = Retention(log)
        # Keyed by (id, lease token): after a stall another deliverer may recover a row
        # and this one claim it again while the stale job's sendmail still runs.
        self.inflight: dict[tuple[int, int], Job] = {}
        self.stops_seen = 0
        self.noted_damage = False
        self.checkpoint_owed = True  # at start, and after the disk was found full
        self.noticed = False  # a sender notice was queued: look for due mail at once
        self._conn: Connection | None = None

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
        self.signals.install()
        try:
            self._conn = self.engine.connect()
            try:
                queries.deliverer_sync(self._conn)
                self._loop()
            finally:
                try:
                    self._shutdown()
                finally:
                    self._conn.close()
        finally:
            self.signals.restore()
            if not self.workers.alive():  # a live worker may still ring the doorbell
                self.results.close()
        return self.tally

    # --- the fault policy -------------------------------------------------------------

    def _loop(self) -> None:
        """Run ``_step`` until done; see "Faults" in the module docstring."""
        failures = 0
        state = _LoopState(time.time() + self.settings.lease / 3)
        while True:
            try:
                if not state.started:
                    self._start()
                    state.started = True
                if self._step(state):
                    return
                failures = 0
            except DBAPIError as exc:
                failures += 1
                # The pass may have consumed a wake-up (a NOTIFY, a data_version step)
                # before the database failed: scan again once it answers.
                state.kicked = True
                give_up = GIVE_UP_ONCE.get(faults.kind(exc), GIVE_UP_ONCE_OTHER)
                if self.signals.stops and failures >= give_up:
                    # Asked to stop while the database keeps failing: do not wait for
                    # it. _shutdown tries once more; what it cannot write is left to
                    # lease expiry (and delivered again: at-least-once).
                    self.log.error("stopping: %s", faults.describe(exc))
                    return
                self._trouble(exc, failures)

    def _trouble(self, exc: DBAPIError, failures: int) -> None:
        kind = faults.kind(exc)
        hint = HINTS.get(kind)
        self.log.error(
            "%s (%d in a row)%s", faults.describe(exc), failures, f"; {hint}" if hint else ""
        )
        if kind == faults.FULL:
            self.checkpoint_owed = True
        elif kind == faults.DAMAGED:
            self._damaged(faults.reason(exc))
        if self.once and failures >= GIVE_UP_ONCE.get(kind, GIVE_UP_ONCE_OTHER):
            raise Stopped(kind, f"{faults.describe(exc)} ({failures} times in a row)") from None
        limit = 5.0 if self.once or self.signals.stops else BACKOFF_MAX
        self.signals.wait(min(limit, 0.1 * 2**failures))

    def _damaged(self, detail: str) -> None:
        if self.noted_damage or not self.database:
            return
        self.noted_damage = True
        damage.mark(self.database, detail, f"smapd[{os.getpid()}]")

    # --- the scheduler ----------------------------------------------------------------

    def _start(self) -> None:
        if self.once:
            now = time.time()
            self.leases.recover(self.conn, now)
            self.leases.due_by = now

    def _step(self, st: _LoopState) -> bool:
        """One pass of the loop; True when the deliverer is done."""
        st.kicked |= self._drain()
        self.signals.poll()
        stopping = bool(self.signals.stops)
        if self.recorder.due(len(self.inflight), stopping, self.once, self.settings.maxchildren):
            self.recorder.flush(self.conn)
            # A notice just queued is due now. SQLite's waker sees this commit too (its
            # data_version moves on our own commits); one that hears only the
            # receivers (PollWaker, a LISTEN) would leave it to the next wakeup scan.
            st.kicked |= self.noticed
            self.noticed = False
        if self.signals.hup:
            self.signals.hup = False
            if self.reload is not None:
                self.settings = self.reload(self.settings)
        if stopping:
            self._stopping()
            if self.recorder.pending:
                self.recorder.flush(self.conn)
            if not self.inflight:
                return True
        elif self._schedule(st):
            return True
        now = time.time()
        if self.inflight and now >= st.next_beat:
            self.leases.renew(self.conn, self.inflight, now + self.settings.lease)
            st.next_beat = now + self.settings.lease / 3
        elif not self.inflight:
            st.next_beat = now + self.settings.lease / 3
        timeout = TICK
        if self.recorder.pending:
            timeout = min(TICK, self.recorder.wait_left())
        st.kicked |= self._wait(timeout)
        return False

    def _schedule(self, st: _LoopState) -> bool:
        """Claim when there is room and reason to; retention when idle. True: done."""
        now = time.time()
        # Claim in batches: when a worker could idle, or when half the prefetch is used
        # up; the prefetched rows' leases are renewed too.
        children = self.settings.maxchildren
        capacity = children + max(children, PREFETCH) - len(self.inflight)
        busy = len(self.inflight) - len(self.recorder.pending)
        wanted = busy < children or capacity >= PREFETCH // 2
        if wanted and (st.kicked or now >= st.next_scan or self.waker.changed()):
            if self.checkpoint_owed:
                # Fold the WAL into the database before claiming: its space is then the
                # deliverer's to reuse, which is what a spool full down to the intake's
                # reserve has left. Claims would append to the WAL and use that room up
                # first; so while this fails (full), nothing is claimed.
                queries.checkpoint(self.conn)
                self.checkpoint_owed = False
            st.kicked = False
            got = self._claim(min(capacity, CLAIM_MAX), now)
            if got == capacity:
                st.next_scan = now  # there may be more due right now
            elif self.once:
                if not self.inflight:
                    self._retain(now)
                    return True
                st.next_scan = now + self.settings.wakeup
            else:
                st.next_scan = self._next_scan(now)
        if not self.once and not self.recorder.pending and self.retention.due(now):
            self._retain(now)
        return False

    def _retain(self, now: float) -> None:
        self.retention.run(self.conn, self.settings, now)

    def _claim(self, limit: int, now: float) -> int:
        jobs = self.leases.claim(self.conn, self.settings, limit, now)
        for job in jobs:
            self.inflight[job.key] = job
            self.workers.submit(job, min(self.settings.maxchildren, len(self.inflight)))
        broken, self.leases.broken = self.leases.broken, []
        for job, why in broken:
            self.inflight[job.key] = job
            self.recorder.add(self.conn, job, Verdict(policy.BAD, why))
        return len(jobs) + len(broken)

    def _next_scan(self, now: float) -> float:
        with self.conn.begin():
            due = queries.next_due_at(self.conn)
        later = now + self.settings.wakeup
        return later if due is None else max(now, min(later, due))

    def _wait(self, timeout: float) -> bool:
        """Sleep until a worker reports, a signal comes or ``timeout``; True if a slot
        was freed. (Not ``SimpleQueue.get(timeout=...)``: see inbox.py.)"""
        self.results.wait(timeout, self.signals.fileno())
        return self._drain()

    def _drain(self) -> bool:
        """Record every verdict waiting; True if a slot was freed."""
        freed = False
        while True:
            try:
                job, verdict = self.results.get_nowait()
            except queue.Empty:
                return freed
            freed |= self.recorder.add(self.conn, job, verdict)

    # --- outcomes ---------------------------------------------------------------------

    def _finished(self, p: Plan) -> None:
        self.inflight.pop(p.job.key, None)
        self.noticed |= p.notice is not None
        directory = p.job.settings.baddir
        if p.kind == policy.BAD and directory:
            baddir.export_bad(self.conn, directory, p.job.id, p.job.queue_id, p.detail, self.log)

    def _given_up(self, job: Job, why: str) -> None:
        self.inflight.pop(job.key, None)
        self.leases.unreadable.add(job.id)
        self.tally.count("unreadable")
        self._damaged(why)

    # --- stop -------------------------------------------------------------------------

    def _stopping(self) -> None:
        # Release what no worker has started yet; abort running children on a 2nd signal.
        self._take_back_unstarted("released at shutdown before it started")
        stops = self.signals.stops
        if stops != self.stops_seen:
            self.stops_seen = stops
            running = len(self.inflight) - len(self.recorder.pending)
            if stops == 1 and running:
                self.log.info(
                    "stopping: letting %d running sendmail(s) finish; signal again to abort",
                    running,
                )
            elif stops > 1:
                self.log.info("aborting %d running sendmail(s)", len(self.inflight))
                for job in self.inflight.values():
                    job.abort.set()

    def _take_back_unstarted(self, why: str) -> None:
        for job in self.workers.unstarted():
            self.recorder.add(self.conn, job, Verdict(RELEASE, why))

    def _shutdown(self) -> None:
        """Leave nothing in ``delivering``: see "Exit" in the module docstring."""
        # On a normal exit nothing is in flight and this only stops the workers; after
        # an error, unstarted jobs are released and running sendmails aborted (a
        # worker must never go on running jobs nobody will record).
        self._take_back_unstarted("released at shutdown before it started")
        for job in self.inflight.values():
            job.abort.set()
        self.workers.stop()
        for worker in self.workers.threads:
            while worker.is_alive():
                worker.join(TICK)
                self._drain_quietly()
        self._drain_quietly()
        now = time.time()
        try:
            if self.recorder.pending:
                self.recorder.flush(self.conn)
            for job in list(self.inflight.values()):  # only after a bug: no verdict came
                self.recorder.add(self.conn, job, Verdict(RELEASE, "released at exit"))
            if self.recorder.pending:
                self.recorder.flush(self.conn)
            stray = self.leases.release_owned(self.conn, now)
        except DBAPIError as exc:
            self.log.error("at exit: %s; leaving rows to lease expiry", faults.describe(exc))
            return
        for row in stray:
            self.log.error("%s: still held at exit; released", row.queue_id)
            self.tally.count(RELEASE)

    def _drain_quietly(self) -> None:
        try:
            self._drain()
        except DBAPIError as exc:  # a SENT ack's write failed; its worker was answered
            self.log.error("at exit: %s", faults.describe(exc))
