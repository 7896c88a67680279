"""``smapq report …`` through the installed CLI: the JSON contract, tables, windows, errors."""

from __future__ import annotations

import csv
import io

import pytest

from smapq.store import queries
from tests.report.conftest import Filled

ROWS_BY = {"senders": "sender", "recipients": "recipient", "clients": "client_addr"}


def metrics_of(doc: dict[str, object]) -> dict[str, object]:
    return {r["metric"]: r["value"] for r in doc["rows"]}  # type: ignore[attr-defined,index]


def test_summary_counts_states_deferred_and_oldest(filled: Filled) -> None:
    doc = filled.json("report", "summary")
    assert doc["report"] == "summary"
    assert doc["format_version"] == 1
    assert doc["since"] is None and doc["until"] is None
    m = metrics_of(doc)
    assert m["received"] == 2  # M3 (deferred) and M8
    assert m["delivering"] == 2
    assert m["delivered"] == 2
    assert m["bad"] == 1
    assert m["held"] == 1
    assert m["total"] == 8
    assert m["bytes"] == sum(range(100, 900, 100))
    assert m["deferred"] == 1
    # The oldest waiting message is M3 (30 min); held and delivering count as waiting.
    assert 29 * 60 <= m["oldest_waiting_age"] <= 31 * 60 + 60  # type: ignore[operator]
    assert m["delivered_in_window"] == 2
    assert m["bad_in_window"] == 1


def test_summary_window_limits_to_mail_received_in_it(filled: Filled) -> None:
    m = metrics_of(filled.json("report", "summary", "--since", "1d"))
    assert m["total"] == 6  # M2 (3 days) and M4 (2 days) are outside
    assert m["delivered_in_window"] == 1
    assert m["bad_in_window"] == 1  # M4 was received two days ago but went bad 20 hours ago
    doc = filled.json("report", "summary", "--since", "2026-01-01", "--until", "2026-01-02")
    assert doc["since"] == "2026-01-01T00:00:00Z" and doc["until"] == "2026-01-02T00:00:00Z"
    assert metrics_of(doc)["total"] == 0


@pytest.mark.parametrize("report", ["senders", "recipients", "clients"])
def test_top_lists_rank_by_messages_with_bytes_and_refused(filled: Filled, report: str) -> None:
    doc = filled.json("report", report, "--top", "2")
    rows = doc["rows"]
    # clients: the 2 busiest plus the refused-only client (see the next test).
    assert len(rows) == (3 if report == "clients" else 2)
    assert doc["more"] is False  # rankings say nothing about more; --top bounds them
    top = rows[0]
    if report == "senders":
        # The two relay-denied RCPTs named alice as a recipient, not as a sender.
        assert top == {"sender": "alice@a.example", "messages": 3, "bytes": 800, "refused": 0}
    elif report == "recipients":
        assert top == {"recipient": "bob@b.example", "messages": 3, "bytes": 800, "refused": 0}
    else:
        assert top["client_addr"] == "192.0.2.1"
        assert top["client_name"] == "mx1.a.example"
        assert top["messages"] == 6


def test_clients_include_one_that_was_only_ever_refused(filled: Filled) -> None:
    rows = filled.json("report", "clients", "--top", "1")["rows"]
    by_addr = {r["client_addr"]: r for r in rows}
    # 198.51.100.7 sent no message at all: only refused commands, still listed.
    assert by_addr["198.51.100.7"] == {
        "client_addr": "198.51.100.7",
        "client_name": None,
        "messages": 0,
        "bytes": 0,
        "refused": 2,
    }
    assert by_addr["192.0.2.1"]["messages"] == 6
    assert len(rows) == 2


def test_senders_count_refusals_of_their_own_transactions(filled: Filled) -> None:
    """A reject counts for a sender when its session's MAIL named that sender; a
    sender that was only ever refused is listed with 0 messages."""
    at = filled.now - 60
    session = {"session_id": "Z1", "client_addr": "203.0.113.5"}
    with filled.engine.begin() as c:
        queries.insert_events(
            c,
            [
                {"at": at, "kind": "connect", "code": 220, **session},
                {"at": at, "kind": "mail", "address": "zed@z.example", "code": 250, **session},
                {"at": at, "kind": "rcpt", "address": "bob@b.example", "code": 250, **session},
                {"at": at, "kind": "reject", "address": "zed@z.example", "code": 552, **session},
                # Another session refuses a RCPT to zed: a recipient's refusal.
                {
                    "at": at,
                    "kind": "reject",
                    "address": "zed@z.example",
                    "code": 554,
                    "session_id": "Z2",
                    "client_addr": "203.0.113.6",
                },
            ],
        )
    rows = {r["sender"]: r for r in filled.json("report", "senders", "--top", "1")["rows"]}
    assert rows["zed@z.example"] == {
        "sender": "zed@z.example",
        "messages": 0,
        "bytes": 0,
        "refused": 1,
    }
    assert rows["alice@a.example"]["refused"] == 0 and len(rows) == 2
    table = filled.smapq("report", "senders", "--top", "1").stdout
    assert "zed@z.example" in table


def test_null_sender_is_shown_as_angle_brackets(filled: Filled) -> None:
    senders = {r["sender"] for r in filled.json("report", "senders", "--top", "50")["rows"]}
    assert "<>" in senders


def test_latency_percentiles_per_period(filled: Filled) -> None:
    doc = filled.json("report", "latency", "--per", "day")
    rows = doc["rows"]
    assert [r["delivered"] for r in rows] == [1, 1]
    assert sorted(r["max"] for r in rows) == [10.0, 100.0]
    for r in rows:
        assert r["p50"] == r["p90"] == r["p99"] == r["max"]
        assert r["period"].endswith("T00:00:00Z")
    hourly = filled.json("report", "latency", "--since", "1d")["rows"]
    assert len(hourly) == 1 and hourly[0]["period"].endswith(":00:00Z")


def test_age_is_a_qshape_grid_of_waiting_recipients(filled: Filled) -> None:
    doc = filled.json("report", "age")
    names = [c["name"] for c in doc["columns"]]
    assert names[:3] == ["domain", "total", "5m"] and names[-1] == "1280m+"
    rows = {r["domain"]: r for r in doc["rows"]}
    total = rows["TOTAL"]
    # received M3 (30 min, e.example), M8 (1 min, 2 rcpts), delivering M6, M7 (b.example)
    assert total["total"] == 5
    assert total["5m"] == 2 and total["10m"] == 2 and total["40m"] == 1
    assert rows["b.example"]["total"] == 3
    held = filled.json("report", "age", "--state", "held")["rows"]
    assert held[0]["total"] == 1


def test_deferred_and_bad_lists(filled: Filled) -> None:
    deferred = filled.json("report", "deferred")["rows"]
    assert [r["queue_id"] for r in deferred] == ["M3"]
    d = deferred[0]
    assert d["attempts"] == 2 and d["last_exit"] == 75
    assert d["last_result"] == "451 4.3.0 try again later"
    assert 500 < d["next_in"] <= 600
    bad = filled.json("report", "bad")["rows"]
    assert [(r["queue_id"], r["sender"], r["last_exit"]) for r in bad] == [("M4", "<>", 67)]


def test_sessions_and_refused_audit_the_envelope_log(filled: Filled) -> None:
    rows = {r["client_addr"]: r for r in filled.json("report", "sessions")["rows"]}
    noisy = rows["198.51.100.7"]
    assert (noisy["connections"], noisy["accepted"], noisy["refused"]) == (3, 0, 2)
    assert (noisy["vrfy"], noisy["expn"], noisy["timeouts"]) == (1, 1, 1)
    assert rows["192.0.2.1"]["accepted"] == 6
    refused = filled.json("report", "refused")["rows"]
    assert refused[0]["kind"] == "reject" and refused[0]["count"] == 2
    assert refused[0]["code"] == 554
    assert {r["kind"] for r in refused} == {"reject", "vrfy", "expn", "timeout"}


ALL_REPORTS = [
    "summary",
    "senders",
    "recipients",
    "clients",
    "latency",
    "age",
    "deferred",
    "bad",
    "sessions",
    "refused",
]


@pytest.mark.parametrize("report", ALL_REPORTS)
def test_tables_fit_80_columns_and_csv_matches_json(filled: Filled, report: str) -> None:
    table = filled.smapq("report", report).stdout
    lines = table.splitlines()
    assert lines, table
    assert all(len(line) <= 80 for line in lines), table
    assert lines[0] == lines[0].upper()  # the header
    doc = filled.json("report", report)
    rows = list(csv.DictReader(io.StringIO(filled.smapq("report", report, "-f", "csv").stdout)))
    assert len(rows) == len(doc["rows"])
    assert list(rows[0]) == [c["name"] for c in doc["columns"]]


def test_long_cells_are_cut_and_width_zero_keeps_them(filled: Filled) -> None:
    long_name = "x" * 120 + "@example.org"
    from tests.report.conftest import add

    with filled.engine.begin() as c:
        add(c, "LONG", received_at=filled.now - 5, sender=long_name, rcpts=["a@b.example"])
        add(c, "LONG2", received_at=filled.now - 4, sender=long_name, rcpts=["a@b.example"])
        add(c, "LONG3", received_at=filled.now - 3, sender=long_name, rcpts=["a@b.example"])
    table = filled.smapq("report", "senders").stdout
    assert "…" in table and all(len(line) <= 80 for line in table.splitlines())
    wide = filled.smapq("report", "senders", "--width", "0").stdout
    assert long_name in wide


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "summary", "--since", "yesterday"], "--since: 'yesterday'"),
        (["report", "senders", "--until", "2026-13-45"], "--until"),
        (["report", "senders", "--since", "1d", "--until", "2d"], "is not before"),
        (["report", "senders", "--format", "xml"], "xml"),
        (["report", "senders", "--top", "0"], "--top"),
        (["queue", "list", "--older-than", "soon"], "--older-than"),
        (["report", "summary", "--since", "99999999999999999999d"], "longer than 100 years"),
        (["queue", "purge", "--older-than", "9999999999w"], "longer than 100 years"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(filled: Filled, args: list[str], message: str) -> None:
    before = filled.fingerprint()
    result = filled.smapq(*args, check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert filled.fingerprint() == before


def test_missing_database_is_one_line(filled: Filled) -> None:
    if filled.spool.database:
        from tests.pgdb import drop_database

        filled.engine.dispose()
        drop_database(filled.spool.database)
    else:
        filled.spool.db.unlink()
    result = filled.smapq("report", "summary", check=False)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1
    assert "queue database" in result.stderr
