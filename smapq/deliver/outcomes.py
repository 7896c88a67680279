"""Outcomes: workers' verdicts turned into row changes, committed in groups.

Purpose: verdicts are committed in groups: every FLUSH_DELAY, or at FLUSH_MAX
verdicts, or at once when stopping. One transaction, several outcomes, each still
fenced by its lease token and each with its event; nothing is committed half.
Waiting a few milliseconds only widens the at-least-once window (a crash before the
commit re-delivers), and it saves a commit per message. A SENT verdict (a batch
accepted while more remain) is committed at once, before its worker goes on.

Faults: a commit that fails leaves every verdict pending; the loop retries it, so an
outcome survives a full disk or a busy database until it can be written. If the
database reports damage, the group is committed one outcome at a time and an
outcome whose row cannot be written is given up (logged: that message may be
delivered again once the database is recovered) instead of blocking every other.

Notices: the sender notices an outcome calls for (a bounce, a delay warning) are
queued in the same transaction as the outcome (notices.py), so a message never turns
bad without its bounce, nor is bounced without turning bad.

Standards: maxqueuetime and the backoff come from policy.py (RFC 5321 4.5.4.1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from smapq.deliver import policy
from smapq.deliver.jobs import CRASHED, RELEASE, SENT, Job, Tally, Verdict
from smapq.deliver.notices import Notices, late
from smapq.store import faults, queries, states

FLUSH_DELAY = 0.02  # outcomes wait at most this long for a shared commit
FLUSH_MAX = 64  # ... or until this many are waiting


class Plan:
    """One verdict turned into the row changes of its outcome."""

    __slots__ = (
        "code",
        "detail",
        "event",
        "expired",
        "held",
        "job",
        "kind",
        "notes",
        "notice",
        "sent",
        "values",
    )

    def __init__(self, job: Job, kind: str, event: str, detail: str, code: int | None) -> None:
        self.job = job
        self.kind = kind
        self.event = event
        self.detail = detail
        self.code = code
        self.values: dict[str, Any] = {}
        self.sent: list[tuple[int, str]] = []
        self.notes: list[tuple[int, str]] = []
        self.expired = False  # bad because maxqueuetime ran out
        self.held = 0.0  # a deferral's seconds on hold, where they matter (_hold_matters)
        self.notice: str | None = None  # queue id of the sender notice it queued

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


class Recorder:
    """Pending verdicts and their group commit."""

    def __init__(
        self,
        log: logging.Logger,
        tally: Tally,
        finished: Callable[[Plan], None],
        given_up: Callable[[Job, str], None],
    ) -> None:
        self.log = log
        self.tally = tally
        self.finished = finished  # after commit, for each outcome that was written
        self.given_up = given_up  # an outcome the damaged database would not take
        self.notices = Notices(log)
        self.pending: list[tuple[Job, Verdict]] = []
        self.since = 0.0

    def add(self, conn: Connection, job: Job, verdict: Verdict) -> bool:
        """Take one verdict; True if its worker is free again."""
        if verdict.kind == SENT:
            job.ack_ok = False
            try:
                job.ack_ok = self._mark_sent(conn, job, verdict)
            finally:
                job.ack.set()  # never leave the worker waiting, even on a DB error
            return False
        if not self.pending:
            self.since = time.monotonic()
        self.pending.append((job, verdict))
        return True

    def due(self, inflight: int, stopping: bool, once: bool, maxchildren: int) -> bool:
        if not self.pending:
            return False
        return (
            len(self.pending) >= FLUSH_MAX
            or time.monotonic() - self.since >= FLUSH_DELAY
            or stopping
            or (len(self.pending) == inflight and (once or inflight < maxchildren))
        )

    def wait_left(self) -> float:
        """Seconds until the pending group must be committed."""
        return max(0.0, self.since + FLUSH_DELAY - time.monotonic())

    def flush(self, conn: Connection) -> None:
        """Commit every pending verdict (see the module docstring for faults)."""
        try:
            self._commit(conn, self.pending)
        except DBAPIError as exc:
            if faults.kind(exc) != faults.DAMAGED:
                raise
            self._one_by_one(conn)
            return
        self.pending = []

    def _one_by_one(self, conn: Connection) -> None:
        while self.pending:
            item = self.pending[0]
            try:
                self._commit(conn, [item])
            except DBAPIError as exc:
                if faults.kind(exc) != faults.DAMAGED:
                    raise  # the rest stays pending for the next try
                self._give_up(item, exc)
            self.pending.pop(0)

    def _give_up(self, item: tuple[Job, Verdict], exc: DBAPIError) -> None:
        job, verdict = item
        self.log.error(
            "%s: outcome %s not recorded, %s: it may be delivered again",
            job.queue_id,
            verdict.kind,
            faults.describe(exc),
        )
        self.given_up(job, faults.reason(exc))

    def _commit(self, conn: Connection, batch: list[tuple[Job, Verdict]]) -> None:
        now = time.time()
        with conn.begin():
            held_for = queries.held_seconds(conn, _hold_matters(batch, now))
            plans = [
                plan(job, verdict, now, held_for.get(job.queue_id, 0.0)) for job, verdict in batch
            ]
            held = queries.record_outcomes(
                conn,
                now,
                [p.row() for p in plans],
                [(*p.job.key, rid, text) for p in plans for rid, text in p.sent],
                [(*p.job.key, rid, text) for p in plans for rid, text in p.notes],
            )
            told = self.notices.queue(conn, now, [p for p in plans if p.job.key in held])
        for line in told:
            self.log.info("%s", line)
        for p in plans:
            if p.job.key not in held:
                self.log.warning(
                    "%s: lease lost, outcome %s (%s) discarded", p.job.queue_id, p.kind, p.detail
                )
                self.tally.count(CRASHED)
                p.kind = CRASHED
            else:
                self.tally.count(p.kind)
                self._log(p)
            self.finished(p)

    def _mark_sent(self, conn: Connection, job: Job, verdict: Verdict) -> bool:
        with conn.begin():
            return queries.mark_sent(
                conn, job.id, job.token, verdict.rcpt_ids, time.time(), verdict.text
            )

    def _log(self, p: Plan) -> None:
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


def _hold_matters(batch: list[tuple[Job, Verdict]], now: float) -> list[str]:
    """Queue ids of deferrals whose give-up deadline matters now (see policy): near
    it, or about to be named in a delay warning (Will-Retry-Until)."""
    out = []
    for job, verdict in batch:
        s = job.settings
        if verdict.kind == policy.RETRY and (
            policy.near_deadline(
                now, job.received_at, job.attempts + 1, s.minbackoff, s.maxbackoff, s.maxqueuetime
            )
            or late(job, now)
        ):
            out.append(job.queue_id)
    return out


def plan(job: Job, verdict: Verdict, now: float, held: float = 0.0) -> Plan:
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
            p.held = held
            p.notes = [(rid, text) for rid in verdict.rcpt_ids]
            return p
        age = f"{int(now - job.received_at)}s" + (f" ({int(held)}s of it held)" if held else "")
        text = f"gave up after {attempts} attempts in {age}: {text}"
    p = Plan(job, policy.BAD, "bad", text, code)
    p.expired = kind == policy.RETRY
    p.values = job.values(states.BAD, attempts)
    p.notes = [(rid, text) for rid in verdict.rcpt_ids]
    return p
