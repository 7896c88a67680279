"""Reports, queue verbs and ``report sql`` on the real PostgreSQL.

The queue is filled with the report tests' known mix (tests/report/conftest.py) on a
fresh database; every report and verb runs as the installed ``smapq``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smapq.store.engine import make_engine
from tests.conftest import make_spool
from tests.report import test_report_daily as daily
from tests.report.conftest import Filled, fill


@pytest.fixture
def pg_filled(tmp_path: Path, pg_url: str) -> Iterator[Filled]:
    spool = make_spool(tmp_path, extra=f"smap, smapd: database {pg_url}\n")
    f = Filled(spool, time.time())
    f.engine.dispose()
    f.engine = make_engine(pg_url)
    fill(f.engine, f.now)
    yield f
    f.engine.dispose()


REPORTS = [
    "summary",
    "senders",
    "recipients",
    "clients",
    "age",
    "deferred",
    "latency",
    "bad",
    "refused",
    "sessions",
]


def test_every_report_runs_on_postgresql(pg_filled: Filled) -> None:
    for name in REPORTS:
        for window in ((), ("--since", "1d")):
            doc = pg_filled.json("report", name, *window)
            assert doc, name
    summary = pg_filled.json("report", "summary", "--since", "30d")
    assert json.dumps(summary)  # plain JSON, no driver types leaked
    metrics = pg_filled.smapq("report", "metrics").stdout
    assert 'smapq_messages{state="delivered"} 2' in metrics


def test_top_recipients_rank_by_count(pg_filled: Filled) -> None:
    doc = pg_filled.json("report", "recipients", "--since", "30d")
    rows = doc["rows"]
    assert rows[0]["recipient"] == "bob@b.example"


def test_report_daily_as_on_sqlite(pg_filled: Filled) -> None:
    """The SQLite suite's own check of every section (hour buckets included)."""
    daily.test_daily_text_has_every_section(pg_filled)


def test_queue_verbs_on_postgresql(pg_filled: Filled) -> None:
    listed = pg_filled.smapq("queue", "list").stdout
    assert "M3" in listed and "M5" in listed
    assert "M3" in pg_filled.smapq("queue", "show", "M3").stdout
    pg_filled.smapq("queue", "hold", "M3")
    assert pg_filled.scalar("SELECT state FROM messages WHERE queue_id = 'M3'") == "held"
    pg_filled.smapq("queue", "release", "M3")
    assert pg_filled.scalar("SELECT state FROM messages WHERE queue_id = 'M3'") == "received"
    pg_filled.smapq("queue", "requeue", "M4")
    assert pg_filled.scalar("SELECT state FROM messages WHERE queue_id = 'M4'") == "received"
    pg_filled.smapq("queue", "delete", "M4")
    assert pg_filled.scalar("SELECT count(*) FROM messages WHERE queue_id = 'M4'") == 0


def test_report_sql_reads(pg_filled: Filled) -> None:
    doc = pg_filled.json("report", "sql", "SELECT queue_id, size FROM messages ORDER BY id")
    assert [r["queue_id"] for r in doc["rows"]][:2] == ["M1", "M2"]
    # A % in the text is the operator's, not a driver placeholder.
    like = "SELECT count(*) AS n FROM messages WHERE mail_from LIKE '%@a.example'"
    assert pg_filled.json("report", "sql", like)["rows"] == [{"n": 3}]


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM messages",
        "UPDATE messages SET state = 'bad'",
        "INSERT INTO events (at, kind) VALUES (1, 'x')",
        "DROP TABLE events",
        "CREATE TABLE x (a int)",
        "CREATE TEMP TABLE x (a int)",
        "TRUNCATE events",
        # Hidden behind a CTE and in lower case: no keyword filter would catch all of these.
        "with x as (delete from recipients returning 1) select * from x",
        "SELECT 1; DELETE FROM messages",
        "DELETE FROM messages RETURNING id",
        "SELECT nextval('messages_id_seq')",
        "SET TRANSACTION READ WRITE",
        "ANALYZE",
        "VACUUM",
        "COMMIT",
        "/* only a comment */",
    ],
)
def test_report_sql_writes_are_refused_by_the_server(pg_filled: Filled, statement: str) -> None:
    before = pg_filled.fingerprint()
    result = pg_filled.smapq("report", "sql", statement, check=False)
    assert result.returncode == 64, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smapq: sql: "), result.stderr
    assert pg_filled.fingerprint() == before


@pytest.mark.parametrize("step", [3600, 86400])
def test_server_percentiles_are_the_reports_nearest_rank(pg_filled: Filled, step: int) -> None:
    """PostgreSQL computes latency percentiles itself; they equal the Python rule the
    SQLite path applies to the streamed rows, period by period, to the last bit."""
    import random

    from smapq.report import reports
    from smapq.store import queries

    rnd = random.Random(9)
    with pg_filled.engine.begin() as conn:
        for n in range(400):
            received = pg_filled.now - rnd.uniform(0, 3 * 86400)
            qid = f"L{n}"
            queries.insert_message(
                conn,
                {
                    "queue_id": qid,
                    "protocol": "ESMTP",
                    "mail_from": "a@b",
                    "size": 1,
                    "trace": "",
                    "body": b"x",
                    "body_sha256": "0" * 64,
                    "received_at": received,
                },
                ["r@x"],
            )
            conn.exec_driver_sql(
                "UPDATE messages SET state = 'delivered', delivered_at = %(d)s "
                "WHERE queue_id = %(q)s",
                {"d": received + rnd.expovariate(1 / 30.0) * rnd.choice((1, 1, 1, 50)), "q": qid},
            )
    with pg_filled.engine.connect() as conn:
        served = queries.report_latency_periods(conn, None, None, step)
        assert served is not None
        streamed = list(
            reports._latency_rows(
                conn.exec_driver_sql(
                    "SELECT delivered_at, delivered_at - received_at FROM messages "
                    "WHERE delivered_at IS NOT NULL ORDER BY delivered_at"
                ).all(),
                step,
            )
        )
    assert [tuple(r) for r in served] == streamed
    assert len(streamed) > 3
