"""Unit tests on the engine API: time parsing, table layout, percentiles, query paths."""

from __future__ import annotations

import hashlib
import io
import random
import time
from collections import Counter

import pytest
from sqlalchemy import Engine, event

from smapq.errors import UsageError
from smapq.report import output, reports, timespec
from smapq.report.queue import headers_of, like
from smapq.store import migrate, queries
from smapq.store.engine import make_engine


def test_parse_when_and_durations() -> None:
    now = 1_800_000_000.0
    assert timespec.parse_when("1h", now) == now - 3600
    assert timespec.parse_when("7d", now) == now - 7 * 86400
    assert timespec.parse_when("2026-11-25", now) == 1795564800.0
    assert timespec.parse_when("2026-11-25T01:00:00+01:00", now) == 1795564800.0
    assert timespec.parse_when("2026-11-25T00:00Z", now) == 1795564800.0
    assert timespec.parse_duration("30d") == 30 * 86400
    assert timespec.parse_duration("1.5h") == 5400
    # 99999999999999999999d overflowed time_t when printed: a traceback, not a line.
    for bad in ("", "1y", "d", "-1d", "tomorrow", "2026-02-30", "99999999999999999999d"):
        with pytest.raises(UsageError):
            timespec.parse_when(bad, now, "--since")
    with pytest.raises(UsageError, match="not before"):
        timespec.window("1h", "2h", now)


def test_human_forms() -> None:
    assert timespec.human_duration(45) == "45s"
    assert timespec.human_duration(312) == "5m12s"
    assert timespec.human_duration(3 * 3600 + 300) == "3h05m"
    assert timespec.human_duration(4 * 86400 + 7200) == "4d02h"
    assert timespec.human_bytes(512) == "512"
    assert timespec.human_bytes(1536) == "1.5K"
    assert timespec.iso(0) == "1970-01-01T00:00:00Z"


def test_table_fits_width_and_cuts_only_flexible_columns() -> None:
    cols = [output.Column("id"), output.Column("n", "int"), output.Column("text", flex=True)]
    rows = [("a", 1, "x" * 200), ("b", 22, "short\x1b[31m")]
    out = io.StringIO()
    output.write_table(output.Report("t", cols, rows), out, 40)
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines)
    assert lines[1].endswith("…")
    assert "\x1b" not in out.getvalue()  # control characters never reach the terminal
    assert lines[0].split() == ["ID", "N", "TEXT"]


def test_json_document_is_stable() -> None:
    cols = [output.Column("at", "time"), output.Column("n", "int", table=False)]
    report = output.Report("x", cols, [(0.0, 3)], since=0.0, generated_at=60.0)
    report.extra["next_after"] = None
    out = io.StringIO()
    output.write_json(report, out)
    import json

    doc = json.loads(out.getvalue())
    assert list(doc) == [
        "report",
        "format_version",
        "generated_at",
        "since",
        "until",
        "columns",
        "rows",
        "more",
        "notes",
        "next_after",
    ]
    assert doc["rows"] == [{"at": "1970-01-01T00:00:00Z", "n": 3}]


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert reports._percentile(values, 0.5) == 50
    assert reports._percentile(values, 0.9) == 90
    assert reports._percentile(values, 0.99) == 99
    assert reports._percentile([7.0], 0.99) == 7


def test_like_escapes_sql_wildcards() -> None:
    assert like("a_b%c") == "a\\_b\\%c"
    assert like("*@example.com") == "%@example.com"
    assert like("x?y") == "x_y"


def test_headers_are_unfolded_and_stop_at_the_body() -> None:
    body = b"Subject: a\r\n long\r\nTo: b\r\n\r\nNot: a header\r\n"
    assert headers_of(body) == [("Subject", "a long"), ("To", "b")]
    assert headers_of(None) == []


@pytest.fixture
def engine(database: str) -> Engine:
    e = make_engine(database, create=True)
    migrate.upgrade(e)
    return e


def test_recipient_ranking_paths_agree_with_brute_force(engine: Engine) -> None:
    """Narrow windows are driven from messages, wide ones counted by complement."""
    rng = random.Random(7)
    now = time.time()
    truth: list[tuple[float, int, list[str]]] = []
    # Mostly in receipt order (ids follow it, as from the receiver), then some imported
    # mail with old receipt times: "strays" inside the id range of later windows.
    times = sorted(now - rng.random() * 30 * 86400 for _ in range(300))
    times += [now - rng.random() * 30 * 86400 for _ in range(20)]
    with engine.begin() as conn:
        for i, at in enumerate(times):
            size = rng.randint(1, 1000)
            rcpts = sorted({f"r{int(40 * rng.random() ** 2)}@x.example" for _ in range(3)})
            body = b"x"
            queries.insert_message(
                conn,
                {
                    "queue_id": f"Q{i:04d}",
                    "received_at": at,
                    "protocol": "SMTP",
                    "mail_from": "s@x.example",
                    "size": size,
                    "trace": "",
                    "body": body,
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                },
                rcpts,
            )
            truth.append((at, size, rcpts))
    windows = [
        (None, None),
        (now - 86400, None),
        (now - 20 * 86400, None),
        (now - 20 * 86400, now - 2 * 86400),
        (None, now - 29 * 86400),
    ]
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    with engine.connect() as conn:
        for since, until in windows:
            counts: Counter[str] = Counter()
            sizes: Counter[str] = Counter()
            for at, size, rcpts in truth:
                if (since is None or at >= since) and (until is None or at < until):
                    for r in rcpts:
                        counts[r] += 1
                        sizes[r] += size
            want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
            got = queries.report_top_recipients(conn, since, until, 10)
            assert [(a, n) for a, n, _ in got] == want, (since, until)
            assert all(b == sizes[a] for a, _, b in got)
    assert any("WITH strays" in sql for sql in seen)  # the id-range plan ran
    # and the other: on SQLite the index is named by a plan hint; PostgreSQL's planner
    # picks it itself (the hints live in smapq/store/dialects)
    inside = "GROUP BY r.address ORDER BY n DESC, r.address"
    if engine.dialect.name == "sqlite":
        inside = "INDEXED BY ix_messages_received_at"
    assert any(inside in sql for sql in seen)


def test_verbs_recheck_state_inside_the_write(engine: Engine) -> None:
    """A deliverer's claim committed between our lookup and our write wins."""
    now = time.time()
    with engine.begin() as conn:
        body = b"x"
        mid = queries.insert_message(
            conn,
            {
                "queue_id": "RACE",
                "protocol": "SMTP",
                "mail_from": "a@b",
                "size": 1,
                "trace": "",
                "body": body,
                "body_sha256": hashlib.sha256(body).hexdigest(),
            },
            ["c@d"],
        )
        found = queries.queue_find(conn, ["RACE"])["RACE"]
        assert found.state == "received"
        # The claim lands after our read ...
        conn.execute(
            queries.messages.update()
            .where(queries.messages.c.id == mid)
            .values(state="delivering", lease_expires_at=now + 60)
        )
        # ... so hold (received -> held) and delete (live lease) change nothing.
        assert not queries.queue_transition(conn, mid, [found.state], "held", now, False)
        assert not queries.queue_delete(conn, mid, now)
        # Once the lease has expired the row may go.
        assert queries.queue_delete(conn, mid, now + 120)
        assert queries.recipients_of(conn, mid) == []


def test_purge_writes_recheck_state_inside_the_write(engine: Engine) -> None:
    """A requeue committed between purge_candidates and the purge keeps body and row."""
    now = time.time()
    with engine.begin() as conn:
        body = b"x"
        mid = queries.insert_message(
            conn,
            {
                "queue_id": "OLDBAD",
                "state": "bad",
                "received_at": now - 90 * 86400,
                "protocol": "SMTP",
                "mail_from": "a@b",
                "size": 1,
                "trace": "",
                "body": body,
                "body_sha256": hashlib.sha256(body).hexdigest(),
            },
            ["c@d"],
        )
        conn.execute(
            queries.messages.update()
            .where(queries.messages.c.id == mid)
            .values(updated_at=now - 60 * 86400)
        )
        (cand,) = queries.purge_candidates(conn, "bad", now - 30 * 86400, (-1.0, 0), 10)
        # An operator's requeue lands after our read ...
        assert queries.queue_transition(conn, mid, ["bad"], "received", now, True)
        # ... so neither the body nor the row of the now received message goes.
        assert queries.purge_bodies(conn, [int(cand.id)], "bad") == []
        assert queries.purge_rows(conn, [int(cand.id)], "bad") == []
        assert queries.message_body(conn, mid) == ("", b"x")
        assert [r.address for r in queries.recipients_of(conn, mid)] == ["c@d"]
        # Back to bad, it goes: body first (failure time kept), then the row.
        queries.queue_transition(conn, mid, ["received"], "bad", now - 50 * 86400, False)
        assert queries.purge_bodies(conn, [mid], "bad") == ["OLDBAD"]
        row = queries.message_by_queue_id(conn, "OLDBAD")
        assert row is not None and row.updated_at == now - 50 * 86400
        assert queries.purge_rows(conn, [mid], "bad") == ["OLDBAD"]
        assert queries.recipients_of(conn, mid) == []


def test_tables_align_wide_and_combining_characters() -> None:
    """Columns are measured in terminal cells: CJK takes two, combining marks none."""
    cols = [output.Column("sender", flex=True), output.Column("n", "int")]
    rows = [
        ("用户@例子.example", 1),
        ("me\u0301@x.example", 22),
        ("plain@x.example", 333),
        ("收件人" * 30 + "@例子.example", 4444),
    ]
    for width in (80, 40):
        out = io.StringIO()
        output.write_table(output.Report("t", cols, rows), out, width)
        lines = out.getvalue().splitlines()
        # The numbers are right-aligned to one edge, so every line is equally wide.
        assert {output.display_width(line) for line in lines} == {
            output.display_width(lines[0])
        }, lines
        assert all(output.display_width(line) <= width for line in lines)
        assert lines[4].split()[0].endswith("…")
    assert output.display_width("用户") == 4 and output.display_width("e\u0301") == 1
    assert output.fit("用户用户", 5) == "用户…"
