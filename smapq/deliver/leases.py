"""Claims and heartbeats: the deliverer's leases on queue rows.

Purpose: take due messages (recovering expired leases of others first), renew the
leases of messages in flight, and release what this deliverer still holds at exit.
Each claim is one transaction; the main thread makes them all.

Damage: SQLite reads a damaged page only when a statement needs it, so one claim of
many rows fails for the sake of one. After the first "database is damaged" error the
leases go careful for the rest of the process: due ids come from the due index (or,
if that is the damaged part, from walking the table by id ranges, halving every range
that fails), each message is claimed in its own transaction, and one that cannot be
read is skipped, counted and named -- never retried in a loop, never fatal. A row
that is read but holds impossible values becomes a Job that can only go bad.

``--once``: ``due_by`` is the run's start, so each message is taken at most once per
run (a deferral or a recovery makes it due later than that).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from smapq.config.settings import SmapdSettings
from smapq.deliver.jobs import Job, Tally
from smapq.store import faults, queries

SCAN_TOP = 2**53  # upper id bound when even max(id) cannot be read


class Leases:
    """This deliverer's claims; ``claim`` returns Jobs for workers."""

    def __init__(
        self, owner: str, log: logging.Logger, tally: Tally, damaged: Callable[[str], None]
    ) -> None:
        self.owner = owner
        self.log = log
        self.tally = tally
        self.damaged = damaged  # called with a description the first time damage shows
        self.careful = False
        self.unreadable: set[int] = set()
        self.broken: list[tuple[Job, str]] = []  # rows read with impossible values
        self.due_by: float | None = None

    # --- claims -----------------------------------------------------------------------

    def recover(self, conn: Connection, now: float) -> None:
        """Expired leases of other deliverers back to the queue (one transaction)."""
        with conn.begin():
            for row in queries.recover_expired(conn, now, keep_owner=self.owner):
                self.log.warning("%s: lease of %s expired, back to the queue", *row[1:3])

    def claim(
        self, conn: Connection, settings: SmapdSettings, limit: int, now: float
    ) -> list[Job]:
        if not self.careful:
            try:
                return self._claim_batch(conn, settings, limit, now)
            except DBAPIError as exc:
                if faults.kind(exc) != faults.DAMAGED:
                    raise
                self._go_careful(faults.describe(exc))
        return self._claim_carefully(conn, settings, limit, now)

    def _claim_batch(
        self, conn: Connection, settings: SmapdSettings, limit: int, now: float
    ) -> list[Job]:
        with conn.begin():
            for row in queries.recover_expired(conn, now, keep_owner=self.owner):
                self.log.warning("%s: lease of %s expired, back to the queue", *row[1:3])
            rows = queries.claim(conn, self.owner, now, settings.lease, limit, self.due_by)
            rcpts = self._recipients(conn, [int(r.id) for r in rows])
            ghosts = self._ghosts(conn, len(rows), limit, now)
        if ghosts:
            for mid in ghosts:
                self._skip(mid, "the due index lists it, the table has no such row")
            self._go_careful(f"{len(ghosts)} due message(s) missing from the messages table")
        return self._jobs(rows, rcpts, settings)

    def _ghosts(self, conn: Connection, claimed: int, limit: int, now: float) -> list[int]:
        """Due ids the claim could not take although it had room: the index names rows
        the table does not give -- damage that raises no error."""
        if claimed >= limit:
            return []
        due_by = now if self.due_by is None else min(now, self.due_by)
        return [i for i in queries.ghost_ids(conn, due_by, limit) if i not in self.unreadable]

    def _recipients(self, conn: Connection, ids: list[int]) -> dict[int, list[tuple[int, str]]]:
        rcpts: dict[int, list[tuple[int, str]]] = {i: [] for i in ids}
        for r in queries.unsent_recipients(conn, ids):
            rcpts[int(r.message_id)].append((int(r.id), str(r.address)))
        return rcpts

    def _jobs(
        self, rows: Iterable[Any], rcpts: dict[int, list[tuple[int, str]]], s: SmapdSettings
    ) -> list[Job]:
        jobs = []
        for row in rows:
            try:
                jobs.append(Job(row, rcpts[int(row.id)], s))
            except (TypeError, ValueError, AttributeError) as exc:
                job = Job.damaged(row, s)
                if job is None:
                    self._skip(int(row.id), f"impossible values: {exc}")
                else:
                    self.broken.append((job, f"damaged row, not sent: {exc}"))
        return jobs

    # --- careful mode -----------------------------------------------------------------

    def _go_careful(self, why: str) -> None:
        if self.careful:
            return
        self.careful = True
        self.log.error(
            "queue database is damaged (%s); claiming one message at a time from now on: "
            "run 'smapq db verify'",
            why,
        )
        self.damaged(why)

    def _claim_carefully(
        self, conn: Connection, settings: SmapdSettings, limit: int, now: float
    ) -> list[Job]:
        try:
            self.recover(conn, now)
        except DBAPIError as exc:
            if faults.kind(exc) != faults.DAMAGED:
                raise
            self.log.error("expired leases not recovered: %s", faults.describe(exc))
        due_by = now if self.due_by is None else min(now, self.due_by)
        jobs: list[Job] = []
        for mid in self._due(conn, due_by, limit):
            if len(jobs) >= limit:
                break
            try:
                with conn.begin():
                    row = queries.claim_one(conn, self.owner, mid, now, settings.lease, due_by)
                    rcpts = self._recipients(conn, [mid]) if row is not None else {}
            except DBAPIError as exc:
                if faults.kind(exc) != faults.DAMAGED:
                    raise
                self._skip(mid, faults.reason(exc))
                continue
            if row is not None:
                jobs.extend(self._jobs([row], rcpts, settings))
        return jobs

    def _due(self, conn: Connection, due_by: float, limit: int) -> list[int]:
        want = limit + len(self.unreadable)
        try:
            with conn.begin():
                ids = queries.due_ids(conn, due_by, want)
        except DBAPIError as exc:
            if faults.kind(exc) != faults.DAMAGED:
                raise
            return self._scan(conn, due_by, limit)
        return [i for i in ids if i not in self.unreadable]

    def _scan(self, conn: Connection, due_by: float, limit: int) -> list[int]:
        """Due ids by walking the table in id ranges; a range that fails is halved until
        the unreadable ids are alone (and skipped)."""
        try:
            with conn.begin():
                low, high = queries.id_bounds(conn)
        except DBAPIError as exc:
            if faults.kind(exc) != faults.DAMAGED:
                raise
            low, high = 1, SCAN_TOP
        found: list[int] = []
        ranges = [(low, high)]
        while ranges and len(found) < limit:
            a, b = ranges.pop()
            try:
                with conn.begin():
                    ids = queries.due_ids_between(conn, a, b, due_by)
            except DBAPIError as exc:
                if faults.kind(exc) != faults.DAMAGED:
                    raise
                if a >= b:
                    self._skip(a, faults.reason(exc))
                else:
                    mid = (a + b) // 2
                    ranges += [(mid + 1, b), (a, mid)]
                continue
            found += [i for i in ids if i not in self.unreadable]
        return found[:limit]

    def _skip(self, message_id: int, why: str) -> None:
        if message_id in self.unreadable:
            return
        self.unreadable.add(message_id)
        self.tally.count("unreadable")
        self.log.error(
            "message id %d: cannot be read from the queue database (%s); skipped",
            message_id,
            why,
        )

    # --- heartbeats -------------------------------------------------------------------

    def renew(
        self, conn: Connection, inflight: dict[tuple[int, int], Job], expires: float
    ) -> None:
        """Extend the leases of messages in flight, expired ones too as long as nobody
        took the row meanwhile (after a stall its sendmail may still be running)."""
        ids = sorted({mid for mid, _ in inflight})
        try:
            with conn.begin():
                kept = queries.renew_leases(conn, self.owner, ids, expires)
        except DBAPIError as exc:
            if faults.kind(exc) != faults.DAMAGED:
                raise
            kept = self._renew_each(conn, ids, expires)
        for (mid, _), job in inflight.items():
            if mid not in kept:
                self.log.warning(
                    "%s: lease lost (expired or taken over); its outcome will be discarded",
                    job.queue_id,
                )

    def _renew_each(self, conn: Connection, ids: list[int], expires: float) -> set[int]:
        kept: set[int] = set()
        for mid in ids:
            try:
                with conn.begin():
                    kept |= queries.renew_leases(conn, self.owner, [mid], expires)
            except DBAPIError as exc:
                if faults.kind(exc) != faults.DAMAGED:
                    raise
                kept.add(mid)  # unknown; the outcome's fence decides
        return kept

    def release_owned(self, conn: Connection, now: float) -> list[Any]:
        with conn.begin():
            return queries.release_owned(conn, self.owner, now, "released at exit")
