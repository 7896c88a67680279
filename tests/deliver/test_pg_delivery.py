"""Delivery on PostgreSQL: many deliverers on one queue, NOTIFY pickup, reconnects.

The real server (tests/pgdb.py), the installed ``smapq deliver`` programs and the
stand-in sendmail; nothing is mocked.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from smapq.store.dialects.postgresql import libpq_url
from smapq.store.engine import make_engine
from tests.conftest import make_spool, program
from tests.deliver.kit import Queue, StandIn, standin, stop, wait_for

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# wakeup 3600: mail picked up within the test's lifetime was noticed by NOTIFY, not by
# the periodic scan.
NO_SCAN = "smapd: wakeup 3600\n"


def pg_queue(root: Path, sendmail: str, url: str, extra: str = "") -> Queue:
    """A spool whose queue is the PostgreSQL database ``url``, migrated by init."""
    spool = make_spool(
        root, extra=f"smap, smapd: database {url}\nsmapd: sendmail {sendmail}\n{extra}"
    )
    q = Queue(spool, sendmail)
    q.engine.dispose()
    q.engine = make_engine(url)
    return q


def _delivered_recipients(standin: StandIn) -> Counter[str]:
    return Counter(r for call in standin.calls() for r in call.recipients)


def test_four_deliverers_deliver_every_message_exactly_once(
    tmp_path: Path, standin: StandIn, pg_url: str
) -> None:
    q = pg_queue(tmp_path, str(standin.path), pg_url, "smapd: maxchildren 4\n")
    wanted = [f"m{n}@x.example" for n in range(120)]
    daemons = [q.start_daemon() for _ in range(4)]
    try:
        for rcpt in wanted:
            q.add([rcpt])
        wait_for(
            lambda: q.states() == {"delivered": len(wanted)}, timeout=180, what="all delivered"
        )
    finally:
        results = [stop(d) for d in daemons]
    assert [code for code, _ in results] == [0, 0, 0, 0], [err for _, err in results]
    got = _delivered_recipients(standin)
    assert sorted(got) == sorted(wanted)
    assert set(got.values()) == {1}
    # Every message was claimed once: one claim event each, no recovery.
    with q.engine.begin() as conn:
        kinds = dict(conn.exec_driver_sql("SELECT kind, count(*) FROM events GROUP BY kind").all())
    q.engine.dispose()
    assert kinds["claim"] == len(wanted)
    assert "recovered" not in kinds


def test_new_mail_is_picked_up_by_notify(tmp_path: Path, standin: StandIn, pg_url: str) -> None:
    q = pg_queue(tmp_path, str(standin.path), pg_url, NO_SCAN)
    daemon = q.start_daemon()
    try:
        for n in range(3):
            qid = q.add([f"n{n}@x.example"])
            wait_for(lambda qid=qid: q.row(qid).state == "delivered", what="NOTIFY pickup")
    finally:
        code, err = stop(daemon)
        q.engine.dispose()
    assert code == 0, err
    assert len(standin.calls()) == 3


def _terminate(url: str, like: str) -> int:
    """Terminate the server backends of smapq connections whose query matches ``like``."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'smapq' "
            "AND pid <> pg_backend_pid() AND query LIKE %s",
            (like,),
        ).fetchall()
    return len(rows)


def test_pickup_survives_lost_connections(tmp_path: Path, standin: StandIn, pg_url: str) -> None:
    """The server drops the LISTEN connection, then the deliverer's own: mail sent after
    each is still picked up without a scan (the waker re-LISTENs; a failed pass scans
    again once the database answers)."""
    q = pg_queue(tmp_path, str(standin.path), pg_url, NO_SCAN)
    daemon = q.start_daemon()
    try:
        first = q.add(["a@x.example"])
        wait_for(lambda: q.row(first).state == "delivered", what="first pickup")
        assert _terminate(pg_url, "LISTEN%") == 1
        second = q.add(["b@x.example"])
        wait_for(lambda: q.row(second).state == "delivered", what="pickup after re-LISTEN")
        assert _terminate(pg_url, "%") >= 2  # the deliverer's connection and the listener
        third = q.add(["c@x.example"])
        wait_for(lambda: q.row(third).state == "delivered", what="pickup after reconnect")
    finally:
        code, err = stop(daemon)
        q.engine.dispose()
    assert code == 0, err
    assert sorted(_delivered_recipients(standin)) == ["a@x.example", "b@x.example", "c@x.example"]


def test_release_from_hold_wakes_the_deliverer(
    tmp_path: Path, standin: StandIn, pg_url: str
) -> None:
    q = pg_queue(tmp_path, str(standin.path), pg_url, NO_SCAN)
    qid = q.add(["held@x.example"])
    q.spool.smapq("queue", "hold", qid)
    daemon = q.start_daemon()
    try:
        other = q.add(["other@x.example"])
        wait_for(lambda: q.row(other).state == "delivered", what="the other message")
        assert q.row(qid).state == "held"
        q.spool.smapq("queue", "release", qid)
        wait_for(lambda: q.row(qid).state == "delivered", what="pickup after release")
    finally:
        code, err = stop(daemon)
        q.engine.dispose()
    assert code == 0, err


def test_once_on_an_unreachable_server_is_one_line(tmp_path: Path, standin: StandIn) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    spool = make_spool(tmp_path)  # a spool for the table; the queue is on a server
    table = spool.table
    table.write_text(
        table.read_text() + f"smap, smapd: database {url}\nsmapd: sendmail {standin.path}\n"
    )
    proc = subprocess.run(
        [program("smapq"), "-t", str(table), "deliver", "--once"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "INFO" not in ln and "warning" not in ln]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "connection" in errors[0]
