"""Retention, run by the deliverer: bodies of delivered mail and old events.

Purpose: without it the queue only grows -- every delivered body stays, and the
envelope log gains a dozen rows per message. ``smapd: keepbodies`` (default 7 days)
is how long a delivered message keeps its body (``queue show``/``export`` need it;
the row and its recipients stay for reports); ``smapd: keepevents`` (default 90
days) how long events are kept, except those of a message still waiting. 0 keeps
them forever. ``smapq queue purge`` remains for anything else (bad mail, rows).

Shape: a pass every RETENTION_EVERY seconds (and at start), in transactions of at
most BATCH rows so the receiver and the claims never wait long for the write lock;
a pass stops after PASS_BATCHES and the next one comes soon if work was left. Each
dropped body gets a ``purged`` event, like ``queue purge``. Freed pages are reused
by later writes; a checkpoint afterwards lets the WAL start over in the space it has.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection

from smapq.config.settings import SmapdSettings
from smapq.store import queries, states

RETENTION_EVERY = 600.0
SOON = 5.0  # seconds to the next pass when one stopped with work left
BATCH = 500
PASS_BATCHES = 10


class Retention:
    """When the next pass is due, and the pass itself."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.next_at = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def run(self, conn: Connection, settings: SmapdSettings, now: float) -> tuple[int, int]:
        """One pass: (bodies dropped, events deleted). Raises DBAPIError like any
        write; the caller's fault handling applies, and the pass is simply retried."""
        self.next_at = now + SOON  # if this pass fails, try again soon, not at once
        budget = PASS_BATCHES
        bodies = events = 0
        if settings.keepbodies:
            bodies, budget = self._bodies(conn, now - settings.keepbodies, now, budget)
        if settings.keepevents and budget > 0:
            events, budget = self._events(conn, now - settings.keepevents, budget)
        if bodies or events:
            queries.checkpoint(conn)
            self.log.info(
                "retention: %d delivered bodies dropped, %d old events deleted", bodies, events
            )
        self.next_at = now + (SOON if budget <= 0 else RETENTION_EVERY)
        return bodies, events

    def _bodies(self, conn: Connection, cutoff: float, now: float, budget: int) -> tuple[int, int]:
        done = 0
        after = (-1.0, 0)
        while budget > 0:
            budget -= 1
            with conn.begin():
                rows = queries.purge_candidates(
                    conn, states.DELIVERED, cutoff, after, BATCH, with_body_only=True
                )
                if not rows:
                    return done, budget + 1
                after = (float(rows[-1].final_at), int(rows[-1].id))
                dropped = set(queries.purge_bodies(conn, [int(r.id) for r in rows], "delivered"))
                queries.insert_events(
                    conn,
                    [
                        {
                            "at": now,
                            "kind": "purged",
                            "queue_id": qid,
                            "detail": "delivered body dropped by smapd (keepbodies)",
                        }
                        for qid in sorted(dropped)
                    ],
                )
            done += len(dropped)
        return done, budget

    def _events(self, conn: Connection, cutoff: float, budget: int) -> tuple[int, int]:
        done = 0
        while budget > 0:
            budget -= 1
            with conn.begin():
                n = queries.purge_events(conn, cutoff, BATCH)
            done += n
            if n < BATCH:
                return done, budget + 1
        return done, budget
