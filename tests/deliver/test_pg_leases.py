"""Leases on PostgreSQL, where each statement of a transaction sees fresh commits.

A message committed by a receiver between the claim and the next statement of the
same transaction must not look like damage (finding 1 of /work/notes/pg-findings.md:
the SQLite-only "ghost" check called it a row the due index lists and the table does
not give, skipped it for good and made the deliverer careful).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from smapq.config.settings import loads
from smapq.deliver.jobs import Tally
from smapq.deliver.leases import Leases
from smapq.store import migrate, queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    e = make_engine(pg_url)
    migrate.upgrade(e)
    yield e
    e.dispose()


def _message(received_at: float) -> dict[str, Any]:
    body = b"x\n"
    return {
        "queue_id": new_queue_id(),
        "protocol": "ESMTP",
        "mail_from": "a@b",
        "size": len(body),
        "trace": "T\n",
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "received_at": received_at,
    }


def test_mail_committed_during_a_claim_is_not_damage(engine: Engine, pg_url: str) -> None:
    other = make_engine(pg_url)
    noted: list[str] = []
    leases = Leases("me:1:x", logging.getLogger("test"), Tally(), noted.append)
    settings = loads("smapd: lease 60\n").smapd
    armed = [True]

    # A receiver commits a due message right after the claim's UPDATE, before the
    # claim transaction's next statement.
    @event.listens_for(engine, "after_cursor_execute")
    def race(_conn: Any, _cur: Any, stmt: str, *_: Any) -> None:
        # The claim's statement: an UPDATE, or on PostgreSQL WITH claimed AS (UPDATE ...).
        if armed[0] and "UPDATE messages" in stmt and "SKIP LOCKED" in stmt:
            armed[0] = False
            with other.begin() as c2:
                queries.insert_message(c2, _message(time.time() - 60), ["r@x"])

    try:
        now = time.time()
        with engine.connect() as conn:
            assert leases.claim(conn, settings, 8, now) == []
            assert not armed[0], "the race did not run"
            assert (leases.careful, noted, leases.unreadable) == (False, [], set())
            # The message is there to be taken by the next claim, as any new mail.
            jobs = leases.claim(conn, settings, 8, time.time())
        assert len(jobs) == 1
    finally:
        other.dispose()
