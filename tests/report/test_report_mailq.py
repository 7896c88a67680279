"""``smapq queue`` / ``queue list`` read like mailq: waiting mail, reasons, recipients left."""

from __future__ import annotations

import re

from tests.report.conftest import Filled


def blocks(text: str) -> dict[str, list[str]]:
    """Queue id -> the lines of its block (the first line starts with the id)."""
    out: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines()[1:]:
        if line and not line.startswith(" "):
            if line.startswith("-- "):
                break
            current = out.setdefault(line.split()[0], [])
        if line:
            current.append(line)
    return out


def _ageless(listing: str) -> str:
    return re.sub(r"\b\d+m\d\ds\b", "AGE", listing)


def test_queue_alone_is_mailq_of_waiting_mail(filled: Filled) -> None:
    out = filled.smapq("queue").stdout
    # Ages are counted from "now": the two runs may straddle a second.
    assert _ageless(out) == _ageless(filled.smapq("queue", "list").stdout)
    head = out.splitlines()[0]
    assert head.split() == ["QUEUE_ID", "STATUS", "SIZE", "AGE", "SENDER", "/", "RECIPIENTS"]
    got = blocks(out)
    assert list(got) == ["M3", "M5", "M6", "M7", "M8"]  # no delivered or bad mail
    m3 = got["M3"]
    assert m3[0].split()[:3] == ["M3", "deferred", "300"]
    assert re.fullmatch(r"30m0\ds", m3[0].split()[3]), m3[0]  # queued 30 minutes ago
    assert m3[0].endswith("dave@d.example")
    assert m3[1].startswith("  (attempt 2, next try in ")
    assert m3[1].endswith(": 451 4.3.0 try again later)")
    # Recipients stand under the sender, as in postqueue -p.
    assert m3[2].strip() == "erin@e.example"
    assert m3[2].index("erin") == head.index("SENDER") == m3[0].index("dave")
    assert [line.strip() for line in got["M8"][1:]] == ["kim@b.example", "-oQ@evil.example"]
    assert got["M5"][0].split()[1] == "held" and got["M6"][0].split()[1] == "delivering"
    assert out.splitlines()[-1] == (
        "-- 2.8K in 5 message(s) (1 deferred, 2 delivering, 1 held, 1 received)"
    )
    assert all(len(line) <= 80 for line in out.splitlines())


def test_all_shows_final_mail_with_its_reason(filled: Filled) -> None:
    out = filled.smapq("queue", "list", "--all").stdout
    got = blocks(out)
    assert list(got) == [f"M{i}" for i in range(1, 9)]
    assert got["M4"][0].split()[1] == "bad" and got["M4"][0].endswith("<>")
    assert got["M4"][1] == "  (attempt 5: 550 5.1.1 user unknown)"


def test_sent_recipients_are_not_listed_as_waiting(filled: Filled) -> None:
    with filled.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE recipients SET sent_at = 1 WHERE address = 'kim@b.example'")
    got = blocks(filled.smapq("queue").stdout)
    assert [line.strip() for line in got["M8"][1:]] == [
        "-oQ@evil.example",
        "(+1 recipient(s) delivered)",
    ]
    row = next(r for r in filled.json("queue", "list")["rows"] if r["queue_id"] == "M8")
    assert row["pending_recipients"] == ["-oQ@evil.example"] and row["status"] == "received"
    csv_out = filled.smapq("queue", "list", "-f", "csv").stdout.splitlines()
    assert csv_out[0].endswith(",status,next_attempt_at,last_result,pending_recipients")


def test_empty_queue_says_so(filled: Filled) -> None:
    with filled.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM recipients")
        conn.exec_driver_sql("DELETE FROM messages WHERE state NOT IN ('delivered', 'bad')")
    assert filled.smapq("queue").stdout == "Mail queue is empty\n"
    assert filled.smapq("queue", "list", "--state", "held").stdout == "No messages match\n"
    assert "M1" in filled.smapq("queue", "list", "--all").stdout
