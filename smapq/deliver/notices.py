"""Sender notices: which outcomes tell the sender, queued with the outcome itself.

Purpose: with ``smapd: bounce on``, a message that goes bad -- a permanent failure, or
``maxqueuetime`` run out -- gets a failure notice to its sender (a "bounce"), listing
the recipients sendmail never accepted; with ``smapd: delaywarning AGE`` as well, the
first deferral of a message older than AGE gets a delay warning (at most one per
message). Each notice is an RFC 3464 report (dsn.py) queued as a new message in the
queue -- null sender, one recipient: the original sender -- so it is delivered by
the same sendmail with the same retries, backoff and ``maxqueuetime`` as any mail,
and goes to ``baddir`` if it cannot be (Postfix's bounce daemon does the same).

Crash safety: ``Notices.queue`` runs inside the outcome's transaction
(outcomes.Recorder), after the outcome's fenced UPDATE: the message turns bad and its
bounce is queued in one COMMIT, or neither happens (a crash, a full disk, a failing
INSERT roll both back; the outcome stays pending and is retried, or the lease expires
and the message is tried again). So no bounce is lost and none is queued twice for one
failure. Outcomes fenced off (lease lost) queue nothing.

Never to the null sender, never a bounce of a bounce: RFC 5321 6.1 and RFC 3834 2
forbid a notice to ``<>``. A message whose reverse-path is null -- every notice smapd
makes, and every DSN other hosts send here -- is recognised by that alone (not by its
headers), and is neither bounced nor warned about: a notice that cannot be delivered
goes bad quietly. A sender smapd would refuse as sendmail's argv (a leading ``-``, a
control character) gets no notice either: it could not be sent.

Diagnostics: one log line per notice after its commit (Postfix's "sender non-delivery
notification: ID"); events ``bounced``/``warned`` on the message and ``dsn`` on the
notice (store/bounces.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sqlalchemy import Connection

from smapq.deliver import command, dsn, policy
from smapq.store import bounces
from smapq.store.ids import new_queue_id

if TYPE_CHECKING:
    from smapq.deliver.jobs import Job
    from smapq.deliver.outcomes import Plan


class Notices:
    """Queue the notices a group of outcomes calls for, in the caller's transaction."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log

    def queue(self, conn: Connection, now: float, plans: Sequence[Plan]) -> list[str]:
        """Queue a notice for each written outcome that calls for one; returns the log
        lines to write once the transaction has committed."""
        lines: list[str] = []
        bounce = [p for p in plans if p.kind == policy.BAD and self._wanted(p, lines)]
        warn = [
            p
            for p in plans
            if p.kind == policy.RETRY and late(p.job, now) and self._wanted(p, lines)
        ]
        if warn:
            told = bounces.warned(conn, [p.job.queue_id for p in warn])
            warn = [p for p in warn if p.job.queue_id not in told]
        if not bounce and not warn:
            return lines
        unsent = bounces.unsent_recipients(conn, [p.job.id for p in bounce + warn])
        made: list[bounces.Notice] = []
        for p in bounce:
            made += self._one(now, p, dsn.FAILED, unsent[p.job.id], None)
        for p in warn:
            s = p.job.settings
            until = p.job.received_at + p.held + s.maxqueuetime
            made += self._one(now, p, dsn.DELAYED, unsent[p.job.id], until)
        bounces.queue_notices(conn, now, made)
        for n in made:
            kind = "non-delivery" if n.event == bounces.BOUNCED else "delay"
            lines.append(f"{n.about}: sender {kind} notification: {n.queue_id}")
        return lines

    def _wanted(self, p: Plan, lines: list[str]) -> bool:
        """Bounce on, and a sender that can be told (never <>)."""
        if not p.job.settings.bounce:
            return False
        try:
            sender = command.sender_arg(p.job.mail_from)
        except command.Refused as exc:
            lines.append(f"{p.job.queue_id}: no notice to the sender: {exc}")
            return False
        if sender == command.NULL_SENDER:
            if p.kind == policy.BAD and p.job.rcpts:  # (a damaged row has neither)
                lines.append(f"{p.job.queue_id}: from=<>: not bounced (null sender)")
            return False
        return True

    def _one(
        self, now: float, p: Plan, action: str, unsent: list[str], until: float | None
    ) -> list[bounces.Notice]:
        """The notice for one outcome (none if nothing failed or it cannot be made)."""
        job = p.job
        if not unsent:
            return []  # nothing left that failed: every recipient was accepted
        queue_id = new_queue_id()
        try:
            report = _report(p, action, now, unsent, until)
            body = dsn.render(report, queue_id, now)
        except Exception:
            # A bug in rendering: said loudly, and the outcome is still recorded --
            # failing it would stop the deliverer on this message again and again.
            self.log.exception("%s: no notice to the sender: it could not be made", job.queue_id)
            return []
        failed = action == dsn.FAILED
        p.notice = queue_id
        return [
            bounces.Notice(
                queue_id,
                report.sender,
                dsn.trace(report.host, queue_id, now),
                body,
                job.queue_id,
                bounces.BOUNCED if failed else bounces.WARNED,
                f"{queue_id}: {len(unsent)} recipient(s) {'failed' if failed else 'delayed'}",
            )
        ]


def _report(
    p: Plan, action: str, now: float, unsent: list[str], until: float | None
) -> dsn.Report:
    job = p.job
    # What this outcome recorded for its recipients (recipients.last_result), without
    # a deferral's "; next try in ...": older per-recipient results may be stale.
    result = p.notes[0][1] if p.notes else p.detail
    entries = []
    for address in unsent:
        entry = dsn.status_of(action, p.code, result, p.expired)
        entry.address = address
        entries.append(entry)
    return dsn.Report(
        action,
        job.settings.host,
        job.queue_id,
        command.sender_arg(job.mail_from),
        job.received_at,
        now,
        entries,
        job.data,  # the trace and the message: dsn returns the header block of it
        until,
    )


def late(job: Job, now: float) -> bool:
    """Is ``job`` old enough for a delay warning, should it be deferred now?"""
    s = job.settings
    return s.bounce and s.delaywarning > 0 and now - job.received_at >= s.delaywarning
