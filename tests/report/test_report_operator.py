"""What an operator reads: the summary explains itself, report sql shows times and blobs."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import text

from tests.conftest import program
from tests.report.conftest import Filled, on_a_terminal


def test_summary_says_what_bad_and_bad_in_window_count(filled: Filled) -> None:
    # M4 went bad (one 'bad' event); a second message went bad and was deleted since.
    with filled.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO events(at, kind, queue_id, code) VALUES (:at, 'bad', 'GONE', 67)"),
            {"at": filled.now - 60},
        )
    out = filled.smapq("report", "summary")
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert lines["bad"].split()[1] == "1" and "in state bad now" in lines["bad"]
    assert lines["bad_in_window"].split()[1] == "2" and "even if requeued" in out.stdout
    assert "note: bad (1) is messages in state bad now; bad_in_window (2) is failures" in (
        out.stderr
    )
    assert all(len(line) <= 80 for line in out.stdout.splitlines())
    # Programs see the same stable columns as before: the explanation is for people.
    doc = filled.json("report", "summary")
    assert [c["name"] for c in doc["columns"]] == ["metric", "value", "unit"]


def test_summary_has_no_note_when_the_counts_agree(filled: Filled) -> None:
    out = filled.smapq("report", "summary")
    assert "bad_in_window" in out.stdout and "note: bad" not in out.stderr


def test_sql_table_shows_times_and_blobs_for_people(filled: Filled) -> None:
    out = filled.smapq(
        "report",
        "sql",
        "SELECT queue_id, received_at, body, trace, size FROM messages WHERE queue_id = 'M1'",
        "--width",
        "0",
    )
    received = filled.scalar("SELECT received_at FROM messages WHERE queue_id = 'M1'")
    shown = dt.datetime.fromtimestamp(received, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    row = out.stdout.splitlines()[1]
    assert shown in row and str(received) not in row
    body = filled.scalar("SELECT length(body) FROM messages WHERE queue_id = 'M1'")
    assert f"<{body} bytes> Subject: test M1↵From: x↵↵hello↵" in row
    assert "\r" not in out.stdout
    # JSON keeps the stored value; the column says it is an epoch time.
    doc = filled.json("report", "sql", "SELECT received_at, at FROM messages, events LIMIT 1")
    assert [c["kind"] for c in doc["columns"]] == ["epoch", "epoch"]
    assert isinstance(doc["rows"][0]["received_at"], float)


def test_sql_time_column_that_is_not_a_number_is_shown_as_is(filled: Filled) -> None:
    out = filled.smapq("report", "sql", "SELECT 'soon' AS due_at, 1e300 AS far_at")
    assert out.stdout.splitlines()[1].split() == ["soon", "1e+300"]


def test_purge_shows_progress_on_a_terminal_only(filled: Filled) -> None:
    cmd = [program("smapq"), "-t", str(filled.spool.table), "queue", "purge"]
    code, out, terminal = on_a_terminal([*cmd, "--older-than", "1d", "--dry-run"])
    assert code == 0 and "\rpurge: 1 messages ...\x1b[K" in terminal
    assert out.startswith("would purge 1 message(s)")
    piped = filled.smapq("queue", "purge", "--older-than", "1d", "--dry-run")
    assert piped.stderr == ""
