"""The claim and lease-recovery statements cost the same with a large backlog.

A fresh queue has no ANALYZE statistics, which is when SQLite's planner is easiest to
mislead; the plan must look messages up by key, never walk all received rows.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from smapq.store import migrate, queries
from smapq.store.engine import make_engine


def _plan(engine: Engine, stmt: object) -> list[str]:
    compiled = stmt.compile(dialect=engine.dialect)  # type: ignore[attr-defined]
    params = tuple(compiled.params[k] for k in compiled.positiontup)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), params)
        return [str(r[3]) for r in rows]


def test_claim_updates_by_primary_key_without_statistics(tmp_path: Path) -> None:
    engine = make_engine(str(tmp_path / "q.db"), create=True)
    migrate.upgrade(engine)
    with engine.begin() as conn:
        for i in range(500):
            queries.insert_message(
                conn,
                {
                    "queue_id": f"Q{i:015d}",
                    "protocol": "SMTP",
                    "mail_from": "a@example.org",
                    "size": 1,
                    "trace": "",
                    "body": b"x",
                    "body_sha256": "0" * 64,
                },
                ["r@example.org"],
            )
    plan = _plan(engine, queries.claim_stmt("owner", 1e12, 60, 16))
    outer = plan[0]
    assert "INTEGER PRIMARY KEY" in outer, plan
    assert any("ix_messages_due" in step for step in plan), plan
    assert not any(step.startswith("SCAN messages") for step in plan), plan
    recover = _plan(engine, queries.recover_expired_stmt(1e12))
    assert "ix_messages_lease" in recover[0], recover
    # The deliverer's own form (it skips its own rows) still walks the lease index.
    mine = _plan(engine, queries.recover_expired_stmt(1e12, keep_owner="me"))
    assert "ix_messages_lease" in mine[0], mine
