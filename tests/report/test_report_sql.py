"""``smapq report sql``: reads work; writes are impossible at the engine, not by keyword."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.report.conftest import Filled


def test_select_streams_rows_as_json(filled: Filled) -> None:
    doc = filled.json(
        "report", "sql", "SELECT state, count(*) AS n FROM messages GROUP BY state ORDER BY state"
    )
    assert doc["report"] == "sql"
    assert {r["state"]: r["n"] for r in doc["rows"]} == {
        "bad": 1,
        "delivered": 2,
        "delivering": 2,
        "held": 1,
        "received": 2,
    }


def test_a_percent_sign_is_the_operators_not_a_placeholder(filled: Filled) -> None:
    like = "SELECT count(*) AS n FROM messages WHERE mail_from LIKE '%@a.example'"
    assert filled.json("report", "sql", like)["rows"] == [{"n": 3}]


def test_limit_and_table(filled: Filled) -> None:
    out = filled.smapq(
        "report", "sql", "SELECT queue_id FROM messages ORDER BY id", "--limit", "3"
    )
    assert out.stdout.split() == ["queue_id", "M1", "M2", "M3"]
    assert "more rows" in out.stderr


@pytest.mark.sqlite_only("PRAGMA is SQLite's")
def test_introspection_pragmas_are_allowed(filled: Filled) -> None:
    doc = filled.json("report", "sql", "PRAGMA table_info(messages)")
    assert "queue_id" in {r["name"] for r in doc["rows"]}


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM messages",
        "UPDATE messages SET state = 'bad'",
        "INSERT INTO events (at, kind) VALUES (1, 'x')",
        "DROP TABLE events",
        "CREATE TABLE x (a)",
        "CREATE TEMP TABLE x (a)",
        "CREATE TABLE x (a int)",
        "CREATE TEMP TABLE x (a int)",
        "TRUNCATE events",
        "PRAGMA query_only = 0",
        "PRAGMA journal_mode = DELETE",
        "ATTACH DATABASE '/tmp/smapq-sql-test.db' AS other",
        "VACUUM",
        "REPLACE INTO messages (id) VALUES (1)",
        # Hidden behind a CTE and in lower case: no keyword filter would catch all of these.
        "with x as (select 1) delete from recipients",
        "with x as (delete from recipients returning 1) select * from x",
        "SELECT 1; DELETE FROM messages",
        "DELETE FROM messages RETURNING id",
        "PRAGMA user_version = 7",
        "PRAGMA wal_checkpoint(TRUNCATE)",
        "PRAGMA optimize",
        "ANALYZE",
        "REINDEX",
        "SELECT load_extension('/nonexistent/evil.so')",
        # Ending the read-only transaction is refused too (was: allowed, then a
        # SQLAlchemy message and exit 1).
        "COMMIT",
        "BEGIN",
        "SAVEPOINT s",
        "/* only a comment */",
        # PostgreSQL's ways out of a read-only transaction, or around it.
        "SET TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SELECT nextval('messages_id_seq')",
        "COPY messages TO '/tmp/smapq-sql-test.csv'",
        "LOCK TABLE messages",
    ],
)
def test_writes_are_refused_in_one_line_and_change_nothing(filled: Filled, statement: str) -> None:
    before = filled.fingerprint()
    result = filled.smapq("report", "sql", statement, check=False)
    assert result.returncode == 64, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smapq: sql: "), result.stderr
    assert filled.fingerprint() == before


def test_syntax_error_is_one_line(filled: Filled) -> None:
    result = filled.smapq("report", "sql", "SELEKT * FROM messages", check=False)
    assert result.returncode == 64
    missing = filled.smapq("report", "sql", "SELECT * FROM nosuch", check=False)
    if filled.spool.database:  # PostgreSQL's own words, on one line
        assert result.stderr.startswith("smapq: sql: ")
        assert 'syntax error at or near "SELEKT"' in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert missing.stderr.startswith("smapq: sql: ")
        assert 'relation "nosuch" does not exist' in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    else:
        assert result.stderr.strip() == 'smapq: sql: near "SELEKT": syntax error'
        assert missing.stderr.strip() == "smapq: sql: no such table: nosuch"


@pytest.mark.sqlite_only("ATTACH and VACUUM INTO make SQLite files")
def test_attach_and_vacuum_into_create_no_file(filled: Filled, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    for statement in (
        f"ATTACH DATABASE '{target}' AS other",
        f"VACUUM INTO '{target}'",
        f"ATTACH DATABASE '{filled.spool.db}' AS again",
    ):
        result = filled.smapq("report", "sql", statement, check=False)
        assert result.returncode == 64, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not target.exists()
