"""``smapq queue …``: listing, show/export, and the verbs that change state."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import program
from tests.report.conftest import Filled


def ids(doc: dict[str, object]) -> list[str]:
    return [r["queue_id"] for r in doc["rows"]]  # type: ignore[attr-defined,index]


def events_of(filled: Filled, qid: str, kind: str) -> list[str]:
    with filled.engine.connect() as conn:
        from sqlalchemy import text

        rows = conn.execute(
            text("SELECT detail FROM events WHERE queue_id = :q AND kind = :k ORDER BY id"),
            {"q": qid, "k": kind},
        )
        return [str(r[0]) for r in rows]


def state_of(filled: Filled, qid: str) -> str | None:
    value = filled.scalar("SELECT state FROM messages WHERE queue_id = :q", q=qid)
    return None if value is None else str(value)


def test_list_filters(filled: Filled) -> None:
    # Like mailq: by default only mail still waiting (received, deferred, delivering, held).
    assert ids(filled.json("queue", "list")) == ["M3", "M5", "M6", "M7", "M8"]
    assert ids(filled.json("queue", "list", "--all")) == [f"M{i}" for i in range(1, 9)]
    assert ids(filled.json("queue", "list", "--state", "bad")) == ["M4"]
    assert ids(filled.json("queue", "list", "--state", "held", "--state", "bad")) == ["M4", "M5"]
    assert ids(filled.json("queue", "list", "--state", "deferred")) == ["M3"]
    assert ids(filled.json("queue", "list", "--state", "received")) == ["M3", "M8"]
    assert ids(filled.json("queue", "list", "--sender", "alice@a.example")) == ["M5"]
    every = ("queue", "list", "--all")
    assert ids(filled.json(*every, "--sender", "alice@a.example")) == ["M1", "M2", "M5"]
    assert ids(filled.json(*every, "--sender", "gina@*")) == ["M6", "M7"]
    assert ids(filled.json(*every, "--recipient", "carol@*")) == ["M1"]
    assert ids(filled.json(*every, "--client", "192.0.2.2")) == ["M3"]
    assert ids(filled.json(*every, "--older-than", "1d")) == ["M2", "M4"]
    assert ids(filled.json(*every, "--newer-than", "7m")) == ["M6", "M7", "M8"]
    # LIKE metacharacters in a pattern are literal.
    assert ids(filled.json(*every, "--sender", "alice%")) == []
    both = filled.smapq("queue", "list", "--all", "--state", "bad", check=False)
    assert both.returncode == 64 and "--all and --state exclude each other" in both.stderr


def test_list_pages_with_after(filled: Filled) -> None:
    every = ("queue", "list", "--all")
    first = filled.json(*every, "--limit", "3")
    assert ids(first) == ["M1", "M2", "M3"]
    assert first["more"] is True and first["next_after"] == "M3"
    second = filled.json(*every, "--limit", "3", "--after", "M3")
    assert ids(second) == ["M4", "M5", "M6"]
    last = filled.json(*every, "--limit", "3", "--after", "M6")
    assert ids(last) == ["M7", "M8"] and last["more"] is False and last["next_after"] is None
    table = filled.smapq(*every, "--limit", "3")
    assert "continue with --after M3" in table.stderr
    assert all(len(line) <= 80 for line in table.stdout.splitlines())


def test_list_without_paging_streams_everything(filled: Filled) -> None:
    doc = filled.json("queue", "list", "--all", "--limit", "0")
    assert len(doc["rows"]) == 8 and doc["more"] is False and doc["next_after"] is None
    rows = filled.smapq("queue", "list", "--all", "--limit", "0", "-f", "csv").stdout
    lines = rows.splitlines()
    assert len(lines) == 9 and lines[0].startswith("queue_id,state,received_at,age,size")


def test_show_has_envelope_recipients_timeline_and_headers(filled: Filled) -> None:
    info = json.loads(filled.smapq("queue", "show", "M1", "--format", "json").stdout)
    assert info["queue_id"] == "M1" and info["state"] == "delivered"
    assert info["received_at"].endswith("Z")
    assert [r["address"] for r in info["recipients"]] == ["bob@b.example", "carol@c.example"]
    kinds = [e["kind"] for e in info["events"]]
    assert kinds == ["connect", "accept", "delivered"]  # the session's and the message's
    assert {"name": "Subject", "value": "test M1"} in info["headers"]
    table = filled.smapq("queue", "show", "M1").stdout
    assert "recipients:" in table and "events:" in table and "Subject" in table


def test_export_writes_trace_then_body_and_records_it(filled: Filled, tmp_path: Path) -> None:
    out = tmp_path / "m1.eml"
    filled.smapq("queue", "export", "M1", "-o", str(out))
    data = out.read_bytes()
    assert data.startswith(b"Received: from mx1.a.example ([192.0.2.1])\r\n\tid M1\r\n")
    assert data.endswith(b"Subject: test M1\r\nFrom: x\r\n\r\nhello\r\n")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    (detail,) = events_of(filled, "M1", "exported")
    assert detail.startswith(f"to {out} by ")
    again = filled.smapq("queue", "export", "M1", "-o", str(out), check=False)
    assert again.returncode != 0 and "exists" in again.stderr
    raw = subprocess.run(
        [program("smapq"), "-t", str(filled.spool.table), "queue", "export", "M1"],
        capture_output=True,
        check=True,
    )
    assert raw.stdout == data


def test_export_that_cannot_write_records_nothing(filled: Filled, tmp_path: Path) -> None:
    before = filled.fingerprint()
    nowhere = filled.smapq(
        "queue", "export", "M1", "-o", str(tmp_path / "no" / "m.eml"), check=False
    )
    assert nowhere.returncode == 1 and "No such file or directory" in nowhere.stderr
    unknown = filled.smapq("queue", "export", "NOSUCH", "-o", str(tmp_path / "m.eml"), check=False)
    assert unknown.returncode == 64 and not (tmp_path / "m.eml").exists()
    assert filled.fingerprint() == before  # no 'exported' event for a file never written


def test_requeue_hold_release_record_events(filled: Filled) -> None:
    out = filled.smapq("queue", "requeue", "M4")
    assert out.stdout.strip() == "M4: bad -> received"
    assert state_of(filled, "M4") == "received"
    due = filled.scalar("SELECT next_attempt_at FROM messages WHERE queue_id = 'M4'")
    assert due <= filled.now + 60
    assert events_of(filled, "M4", "requeued")[0].startswith("bad -> received by ")

    filled.smapq("queue", "hold", "M4", "M3")
    assert state_of(filled, "M4") == state_of(filled, "M3") == "held"
    assert len(events_of(filled, "M3", "held")) == 1
    filled.smapq("queue", "release", "M3")
    assert state_of(filled, "M3") == "received"
    assert len(events_of(filled, "M3", "released")) == 1


def test_requeue_all_bad(filled: Filled) -> None:
    out = filled.smapq("queue", "requeue", "--all-bad")
    assert "M4: bad -> received" in out.stdout
    assert filled.scalar("SELECT count(*) FROM messages WHERE state = 'bad'") == 0


def test_verbs_report_what_they_leave_alone(filled: Filled) -> None:
    result = filled.smapq("queue", "release", "M3", "M5", check=False)
    assert result.returncode == 1
    assert "M5: held -> received" in result.stdout
    assert "M3: unchanged (deferred): not held" in result.stdout
    assert "1 of 2 message(s) left unchanged" in result.stderr
    hold = filled.smapq("queue", "hold", "M6", check=False)
    assert hold.returncode == 1 and "in delivery" in hold.stdout
    assert state_of(filled, "M6") == "delivering"


def test_delete_is_safe_against_in_flight_delivery(filled: Filled) -> None:
    dry = filled.smapq("queue", "delete", "--dry-run", "M7", "M2")
    assert "M7: would go delivering -> deleted" in dry.stdout
    assert state_of(filled, "M7") == "delivering" and state_of(filled, "M2") == "delivered"

    live = filled.smapq("queue", "delete", "M6", "M7", check=False)
    assert live.returncode == 1
    assert "M6: unchanged (delivering): in delivery (lease until" in live.stdout
    assert "M7: delivering -> deleted" in live.stdout  # its lease had expired
    assert state_of(filled, "M6") == "delivering"
    assert state_of(filled, "M7") is None
    assert filled.scalar("SELECT count(*) FROM recipients WHERE address = 'ivan@b.example'") == 0
    assert events_of(filled, "M7", "deleted")[0].startswith("delivering -> deleted by ")


@pytest.mark.parametrize("verb", ["requeue", "hold", "release", "delete"])
def test_unknown_id_changes_nothing(filled: Filled, verb: str) -> None:
    before = filled.fingerprint()
    result = filled.smapq("queue", verb, "M4", "NOSUCH", check=False)
    assert result.returncode == 64
    assert result.stderr.strip() == "smapq: no message with queue id NOSUCH; nothing changed"
    assert filled.fingerprint() == before


@pytest.mark.parametrize(
    "args", [["show", "NOSUCH"], ["export", "NOSUCH"], ["list", "--after", "NOSUCH"]]
)
def test_unknown_id_in_read_verbs(filled: Filled, args: list[str]) -> None:
    result = filled.smapq("queue", *args, check=False)
    assert result.returncode == 64
    assert len(result.stderr.strip().splitlines()) == 1 and "NOSUCH" in result.stderr


def test_purge_drops_old_bodies_then_rows(filled: Filled) -> None:
    before = filled.fingerprint()
    dry = filled.smapq("queue", "purge", "--older-than", "1d", "--dry-run")
    assert "would purge 1 message(s)" in dry.stdout
    assert filled.fingerprint() == before

    keep = filled.smapq("queue", "purge", "--older-than", "1d", "--keep-rows")
    assert (
        "purged 1 message(s)" in keep.stdout and "1 bodies dropped, 0 rows deleted" in keep.stdout
    )
    assert filled.scalar("SELECT body IS NULL FROM messages WHERE queue_id = 'M2'") == 1
    assert filled.scalar("SELECT body IS NULL FROM messages WHERE queue_id = 'M1'") == 0
    export = filled.smapq("queue", "export", "M2", check=False)
    assert export.returncode != 0 and "purged" in export.stderr

    rows = filled.smapq("queue", "purge", "--older-than", "1d", "--bad")
    assert "purged 1 message(s)" in rows.stdout  # M2's row; M4 failed only 20 hours ago
    assert state_of(filled, "M2") is None
    assert (
        filled.scalar("SELECT count(*) FROM events WHERE queue_id = 'M2' AND kind = 'purged'") == 2
    )
    # The envelope log outlives the message.
    assert (
        filled.scalar("SELECT count(*) FROM events WHERE queue_id = 'M2' AND kind = 'delivered'")
        == 1
    )
    everything = filled.smapq("queue", "purge", "--older-than", "1m", "--bad")
    assert "purged 2 message(s)" in everything.stdout  # M1 (delivered) and M4 (bad)
    assert {state_of(filled, q) for q in ("M1", "M4")} == {None}
