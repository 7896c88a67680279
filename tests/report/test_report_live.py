"""Reports and queue verbs on mail that went through the real ``smap`` and ``smapq deliver``.

The other report tests seed rows through the store API; these feed SMTP sessions to the
installed receiver (socket-less, ``$REMOTE_ADDR`` names the client), deliver with the
installed deliverer and the stand-in sendmail (exit 0, 75 and 69), and read everything
back through the installed ``smapq`` as an operator would.
"""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from smapq.report.output import display_width
from smapq.store.engine import make_engine
from tests.conftest import Backend, Spool, program
from tests.deliver.kit import StandIn, wait_for
from tests.receive.conftest import spool_for_receiver
from tests.report.test_report_metrics_help import parse_exposition

pytestmark = pytest.mark.integration

ABUSER = "198.51.100.7"
CJK = "用户@例子.example"
LONG = "a-very-long-local-part-that-goes-on-and-on@an-extremely-long-subdomain.example"


def smtp(*lines: str, data: str | None = None) -> bytes:
    """An SMTP client script: commands, then (if data) DATA, the message and QUIT."""
    out = "".join(line + "\r\n" for line in lines)
    if data is not None:
        out += "DATA\r\n" + data.replace("\n", "\r\n") + "\r\n.\r\n"
    return (out + "QUIT\r\n").encode()


class Site:
    """A spool whose smapd runs the stand-in; sessions through the installed smap."""

    def __init__(self, root: Path, extra: str = "") -> None:
        self.standin = StandIn(root / "sendmail")
        self.spool: Spool = spool_for_receiver(
            root,
            f"smapd: sendmail {self.standin.path}\nsmapd: lease 5\n"
            "smap: maxrecip 3\nsmap: maxbytes 2048\n"
            # whole sessions on a pipe: pipelined where no client may (not the point here)
            "smap: strictpipelining off\n" + extra,
        )
        self.engine = make_engine(self.spool.target)

    def session(self, client: str, script: bytes, table: Path | None = None) -> bytes:
        done = subprocess.run(
            [program("smap"), "-t", str(table or self.spool.table)],
            input=script,
            capture_output=True,
            timeout=60,
            env={"REMOTE_ADDR": client, "REMOTE_PORT": "4000"},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def send(self, client: str, sender: str, rcpts: list[str], subject: str = "t") -> str:
        utf8 = "" if (sender + "".join(rcpts)).isascii() else " SMTPUTF8"
        lines = ["EHLO client.example", f"MAIL FROM:<{sender}>{utf8}"]
        lines += [f"RCPT TO:<{r}>" for r in rcpts]
        out = self.session(client, smtp(*lines, data=f"Subject: {subject}\n\nhello"))
        marker = b"queued as "
        assert marker in out, out
        return out.split(marker)[1].split(b"\r\n")[0].decode()

    def smapq(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.spool.smapq(*args, check=False)

    def json(self, *args: str) -> dict[str, Any]:
        result = self.smapq(*args, "--format", "json")
        assert result.returncode == 0, result.stderr
        doc: dict[str, Any] = json.loads(result.stdout)
        return doc

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def state(self, qid: str) -> str | None:
        value = self.scalar("SELECT state FROM messages WHERE queue_id = :q", q=qid)
        return None if value is None else str(value)

    def kinds(self, qid: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT kind FROM events WHERE queue_id = :q ORDER BY id"), {"q": qid}
            )
            return [str(k) for (k,) in rows]

    def calls_for(self, rcpt: str) -> int:
        return sum(1 for c in self.standin.calls() if rcpt in c.recipients)


@pytest.fixture
def site(open_dir: Path, backend: Backend) -> Site:
    return Site(open_dir)


def abuse(site: Site) -> None:
    """What a spammer's probe looks like: every refusal the receiver logs."""
    big = "\n".join(["Subject: big", ""] + ["x" * 100] * 40)
    script = smtp(
        "EHLO evil.example",
        "VRFY root",
        "EXPN staff",
        "MAIL FROM:<bad syntax",
        "RCPT TO:<x@y.example>",
        "MAIL FROM:<mallory@evil.example>",
        "RCPT TO:<r1@d.example>",
        "RCPT TO:<r2@d.example>",
        "RCPT TO:<r3@d.example>",
        "RCPT TO:<r4@d.example>",
        "RCPT TO:<-oQ@d.example>",
        data=big,
    )
    out = site.session(ABUSER, script)
    for code in (b"252 ", b"502 ", b"501 ", b"503 ", b"452 ", b"553 ", b"552 "):
        assert b"\r\n" + code in out, (code, out)


def test_reports_show_what_the_receiver_and_deliverer_logged(site: Site) -> None:
    ok = site.send("192.0.2.1", "alice@a.example", ["bob@b.example", "carol@c.example"])
    deferred = site.send("192.0.2.1", "alice@a.example", ["exit75@b.example"])
    bad = site.send("192.0.2.2", "", ["exit69@c.example"])
    wide = site.send("2001:db8::1", CJK, ["ñandú@ejemplo.example", LONG, "me\u0301@x.example"])
    abuse(site)
    slow = site.spool.root / "slow-table"
    slow.write_text(site.spool.table.read_text() + "smap: timeout 1\n")
    slow.chmod(0o600)
    proc = subprocess.Popen(
        [program("smap"), "-t", str(slow)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"REMOTE_ADDR": "203.0.113.9"},
    )
    assert proc.stdin is not None
    proc.stdin.write(b"HELO slow.example\r\n")
    proc.stdin.flush()
    # stdin stays open: smap gives up on the idle client itself and exits.
    assert proc.wait(timeout=60) == 0
    assert proc.stdout is not None
    assert b"421 " in proc.stdout.read()
    proc.stdin.close()
    proc.stdout.close()
    site.smapq("deliver", "--once")
    assert (site.state(ok), site.state(deferred), site.state(bad)) == (
        "delivered",
        "received",
        "bad",
    )

    summary = {r["metric"]: r["value"] for r in site.json("report", "summary")["rows"]}
    assert (summary["delivered"], summary["bad"], summary["received"]) == (2, 1, 1)
    assert summary["deferred"] == 1 and summary["bad_in_window"] == 1

    sessions = {r["client_addr"]: r for r in site.json("report", "sessions")["rows"]}
    probe = sessions[ABUSER]
    assert (probe["connections"], probe["accepted"], probe["refused"]) == (1, 0, 5)
    assert (probe["vrfy"], probe["expn"], probe["timeouts"]) == (1, 1, 0)
    assert sessions["203.0.113.9"]["timeouts"] == 1
    assert sessions["192.0.2.1"]["accepted"] == 2

    refused = site.json("report", "refused")["rows"]
    mine = {(r["kind"], r["code"]) for r in refused if r["client_addr"] == ABUSER}
    assert mine == {
        ("vrfy", 252),
        ("expn", 502),
        ("reject", 501),
        ("reject", 503),
        ("reject", 452),
        ("reject", 553),
        ("reject", 552),
    }
    assert ("timeout", 421) in {(r["kind"], r["code"]) for r in refused}
    samples = {r["code"]: (r["address"], r["detail"]) for r in refused}
    assert samples[452] == ("r4@d.example", "too many recipients")
    assert samples[552][0] == "mallory@evil.example"
    table = site.smapq("report", "refused").stdout
    assert "r4@d.example: too many" in table

    clients = {r["client_addr"]: r for r in site.json("report", "clients")["rows"]}
    assert (clients[ABUSER]["messages"], clients[ABUSER]["refused"]) == (0, 5)
    assert clients["192.0.2.1"]["messages"] == 2

    deferred_rows = site.json("report", "deferred")["rows"]
    assert [(r["queue_id"], r["last_exit"]) for r in deferred_rows] == [(deferred, 75)]
    bad_rows = site.json("report", "bad")["rows"]
    assert [(r["queue_id"], r["last_exit"], r["sender"]) for r in bad_rows] == [(bad, 69, "<>")]
    latency = site.json("report", "latency")["rows"]
    assert sum(r["delivered"] for r in latency) == 2
    age = {r["domain"]: r["total"] for r in site.json("report", "age")["rows"]}
    assert age == {"TOTAL": 1, "b.example": 1}
    senders = {r["sender"]: r for r in site.json("report", "senders")["rows"]}
    assert CJK in senders and "<>" in senders
    # Only the 552 after DATA named mallory as the sender of its transaction.
    assert (
        senders["mallory@evil.example"]["messages"],
        senders["mallory@evil.example"]["refused"],
    ) == (0, 1)
    assert senders["alice@a.example"]["refused"] == 0

    for report in (
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
    ):
        table = site.smapq("report", report)
        assert table.returncode == 0, table.stderr
        assert all(display_width(line) <= 80 for line in table.stdout.splitlines()), table.stdout
        doc = site.json("report", report)
        rows = list(csv.DictReader(io.StringIO(site.smapq("report", report, "-f", "csv").stdout)))
        assert len(rows) == len(doc["rows"]), report
    listing = site.smapq("queue", "list", "--all").stdout.splitlines()
    # SENDER is the last column, so the columns before it end at one terminal cell.
    cjk_line = next(line for line in listing if CJK in line)
    assert display_width(cjk_line[: cjk_line.index(CJK)]) == listing[0].index("SENDER")

    shown = site.smapq("queue", "show", wide).stdout
    assert all(display_width(line) <= 80 for line in shown.splitlines()), shown
    events = site.json("queue", "show", wide)["events"]
    assert [e["address"] for e in events if e["kind"] == "rcpt"] == [
        "ñandú@ejemplo.example",
        LONG,
        "me\u0301@x.example",
    ]
    assert "ADDRESS" in shown  # the timeline says which recipient each RCPT named

    metrics = parse_exposition(site.smapq("report", "metrics").stdout)
    assert metrics['smapq_messages{state="delivered"}'] == 2
    assert metrics["smapq_refused_total"] == 5
    assert metrics["smapq_sessions_total"] == 6


def lease_expired(site: Site, *qids: str) -> bool:
    with site.engine.connect() as conn:
        leases = [
            conn.execute(
                text("SELECT lease_expires_at FROM messages WHERE queue_id = :q"), {"q": q}
            ).scalar()
            for q in qids
        ]
    return all(t is not None and t < time.time() for t in leases)


def test_verbs_against_a_delivery_in_flight(site: Site) -> None:
    """Delete/hold/requeue while sendmail runs: fenced by the lease and its token."""
    gone = site.send("192.0.2.1", "a@a.example", ["first@b.example"])
    kept = site.send("192.0.2.1", "a@a.example", ["second@b.example"])
    site.standin.hold()
    deliverer = subprocess.Popen(
        [program("smapq"), "-t", str(site.spool.table), "deliver", "--once"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: len(site.standin.calls()) == 2, what="both sendmails running")
        # A live lease: nothing is touched, and the operator is told why.
        for verb in ("hold", "delete", "requeue", "release"):
            result = site.smapq("queue", verb, gone)
            assert result.returncode == 1
            assert f"{gone}: unchanged (delivering): in delivery (lease until" in result.stdout
        assert site.state(gone) == site.state(kept) == "delivering"

        # The deliverer hangs past its lease while sendmail still runs.
        deliverer.send_signal(signal.SIGSTOP)
        wait_for(lambda: lease_expired(site, gone, kept), what="the leases to expire")
        deleted = site.smapq("queue", "delete", gone)
        assert deleted.returncode == 0, deleted.stderr
        assert f"{gone}: delivering -> deleted (its lease had expired" in deleted.stdout
        # Requeue or hold would let a second sendmail start beside the running one.
        for verb in ("requeue", "hold"):
            result = site.smapq("queue", verb, kept)
            assert result.returncode == 1
            assert "lease expired at" in result.stdout
        assert site.calls_for("second@b.example") == 1
        assert site.state(kept) == "delivering"
    finally:
        site.standin.release()
        deliverer.send_signal(signal.SIGCONT)
        deliverer.wait(timeout=120)

    # The late "delivered" outcome of the deleted message was discarded, not applied.
    assert site.state(gone) is None
    assert site.scalar("SELECT count(*) FROM recipients WHERE address = 'first@b.example'") == 0
    assert site.kinds(gone)[-1] == "deleted"
    assert "delivered" not in site.kinds(gone)
    assert not {"requeued", "held"} & set(site.kinds(kept))
