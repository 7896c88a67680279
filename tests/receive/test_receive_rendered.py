"""The receiver's SQL strings are the statements of smapq.store.queries, rendered."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from smapq.store import queries, rendered
from smapq.store.intake_sqlite import SqliteIntake
from tests.conftest import make_spool


def test_rendered_sql_matches_queries() -> None:
    want = queries.receiver_sql()
    got = {name: getattr(rendered, name, None) for name in want}
    if got != want:
        lines = [f"{name} = {sql!r}" for name, sql in want.items()]
        raise AssertionError("smapq/store/rendered.py is stale; new text:\n" + "\n".join(lines))


PRAGMAS = ("journal_mode", "synchronous", "foreign_keys", "temp_store", "busy_timeout")


def test_receiver_connection_matches_the_engine_pragmas(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    q = SqliteIntake(str(spool.db))
    try:
        values = {
            name: q.conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in (
                "journal_mode",
                "synchronous",
                "foreign_keys",
                "temp_store",
                "busy_timeout",
            )
        }
    finally:
        q.close()
    # journal_mode is persistent: smapq init (SQLAlchemy engine) set WAL in the file.
    assert values == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL
        "foreign_keys": 1,
        "temp_store": 2,  # MEMORY
        "busy_timeout": rendered.BUSY_TIMEOUT_MS,
    }


def test_engine_sets_the_same_durability_pragmas(tmp_path: Path) -> None:
    from smapq.store.engine import make_engine

    spool = make_spool(tmp_path)
    engine = make_engine(str(spool.db))
    try:
        with engine.connect() as conn:
            sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            fks = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        engine.dispose()
    assert (sync, fks) == (2, 1)
    assert "PRAGMA synchronous = FULL" in rendered.PRAGMAS
    assert "PRAGMA foreign_keys = ON" in rendered.PRAGMAS
    with sqlite3.connect(spool.db) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
