"""``smapq db copy --to URL``: a SQLite queue moved into the real PostgreSQL, row for row.

The source queue is a real spool made by ``smapq init`` and filled with every kind of
row there is (waiting, deferred, held, bad, delivered, being delivered; recipients
sent and unsent; session and message events; NULLs, binary bodies, floats with every
digit); the copy runs as the installed program. A kill -9 in the middle of the
messages and again in the middle of the events is followed by re-runs that finish.
"""

from __future__ import annotations

import hashlib
import os
import pty
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from smapq.store import migrate
from smapq.store.engine import make_engine
from smapq.store.schema import events, messages, recipients
from tests.conftest import Spool, make_spool, program
from tests.deliver.kit import wait_for

STATES = ("received", "received", "held", "bad", "delivered", "delivering")


def libpq(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def fill(db: Path, n: int, seed: int = 7, first: int = 1) -> None:
    """``n`` messages with ids from ``first`` and their recipients and events."""
    rnd = random.Random(seed)
    m_rows, r_rows, e_rows = [], [], []
    for i in range(first, first + n):
        state = STATES[i % len(STATES)]
        body = rnd.randbytes(200 + i % 900) + b"\x00\xff\r\n.\r\n"
        received = 1.7e9 + rnd.random() * 1e7
        leased = state == "delivering"
        m_rows.append(
            (
                i,
                f"Q{i:08d}{rnd.randrange(1 << 30):08x}",
                state,
                received,
                f"S{i % 97}",
                None if i % 11 == 0 else f"192.0.2.{i % 250}",
                None if i % 11 == 0 else 1024 + i % 60000,
                None if i % 5 == 0 else f"client{i}.example.org",
                "helo.example.org",
                "ESMTP" if i % 2 else "SMTP",
                "" if i % 13 == 0 else f"sender{i % 50}@example.org",
                len(body),
                f"Received: from x ({i})\r\n",
                body,
                hashlib.sha256(body).hexdigest(),
                i % 4,
                received + (3600.5 if i % 3 == 0 else 0.0),
                f"host-a:{i % 3}" if leased else None,
                time.time() + 600.25 if leased else None,
                i % 5,
                75 if i % 4 else None,
                "temporary failure\u00e9" if i % 4 else None,
                received + 10.125 if state == "delivered" else None,
                received + 1 / 3,
            )
        )
        for pos in range(1 + i % 3):
            r_rows.append(
                (
                    i,
                    pos,
                    f"rcpt{pos}.{i}@example.net",
                    received + 2.5 if (state == "delivered" or (pos == 0 and i % 2)) else None,
                    "250 ok" if pos == 0 else None,
                )
            )
        e_rows.append((received, "accept", f"S{i % 97}", m_rows[-1][1], None, None, 250, None))
        e_rows.append((received + 0.5, "rcpt", None, m_rows[-1][1], "10.0.0.1", "x@y", None, "d"))
    cols = ", ".join(c.name for c in messages.columns)
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            f"INSERT INTO messages ({cols}) VALUES ({', '.join('?' * len(messages.columns))})",
            m_rows,
        )
        conn.executemany(
            "INSERT INTO recipients (message_id, position, address, sent_at, last_result)"
            " VALUES (?, ?, ?, ?, ?)",
            r_rows,
        )
        conn.executemany(
            "INSERT INTO events (at, kind, session_id, queue_id, client_addr, address, code,"
            " detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            e_rows,
        )
    conn.close()


def rows_sqlite(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return [tuple(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY id")]
    finally:
        conn.close()


def rows_pg(url: str, table: str, where: str = "") -> list[tuple[Any, ...]]:
    cols = {"messages": messages, "recipients": recipients, "events": events}[table].columns
    names = ", ".join(c.name for c in cols)
    with psycopg.connect(libpq(url)) as conn:
        return [tuple(r) for r in conn.execute(f"SELECT {names} FROM {table} {where} ORDER BY id")]


def count_pg(url: str, table: str) -> int:
    try:
        with psycopg.connect(libpq(url)) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    assert row is not None
    return int(row[0])


def copy(spool: Spool, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return spool.smapq("db", "copy", "--to", url, *args, check=False)


def start_copy(spool: Spool, url: str, *args: str) -> subprocess.Popen[bytes]:
    """A copy to be killed: its output is of no interest."""
    return subprocess.Popen(
        [program("smapq"), "-t", str(spool.table), "db", "copy", "--to", url, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def counts_line(out: str, table: str) -> list[int]:
    line = next(x for x in out.splitlines() if x.startswith(table + " "))
    return [int(v) for v in line.split()[1:]]


def assert_same_queue(db: Path, url: str, before: float, after: float) -> None:
    """Every row and column as in the source; delivering rows released."""
    names = [c.name for c in messages.columns]
    src, dst = rows_sqlite(db, "messages"), rows_pg(url, "messages")
    assert len(src) == len(dst)
    for s, d in zip(src, dst, strict=True):
        sd, dd = dict(zip(names, s, strict=True)), dict(zip(names, d, strict=True))
        if sd["state"] == "delivering":
            assert dd["state"] == "received"
            assert dd["attempts"] == sd["attempts"] + 1
            assert dd["lease_expires_at"] is None
            assert before <= dd["next_attempt_at"] <= after
            assert dd["updated_at"] == dd["next_attempt_at"]
            for k in ("state", "attempts", "lease_expires_at", "next_attempt_at", "updated_at"):
                del sd[k], dd[k]
        assert sd == dd
    assert rows_sqlite(db, "recipients") == rows_pg(url, "recipients")
    assert rows_sqlite(db, "events") == rows_pg(url, "events", "WHERE kind <> 'recovered'")
    released = [r[1] for r in src if r[2] == "delivering"]
    recovered = rows_pg(url, "events", "WHERE kind = 'recovered'")
    assert sorted(r[4] for r in recovered) == sorted(released)


def assert_sequences_past(url: str) -> None:
    with psycopg.connect(libpq(url)) as conn:
        for table in ("messages", "recipients", "events"):
            top = conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
            nxt = conn.execute(f"SELECT nextval('{table}_id_seq')").fetchone()
            assert top is not None and nxt is not None and nxt[0] > top[0], table


@pytest.fixture
def source(tmp_path: Path) -> Spool:
    spool = make_spool(tmp_path)
    fill(spool.db, 60)
    return spool


def test_copy_moves_every_row_and_column(source: Spool, pg_url: str) -> None:
    before = time.time()
    done = copy(source, pg_url)
    after = time.time()
    assert done.returncode == 0, done.stderr
    assert "schema 0002 made in the target" in done.stdout
    assert counts_line(done.stdout, "messages") == [60, 60, 60]
    assert counts_line(done.stdout, "recipients") == [120, 120, 120]
    assert counts_line(done.stdout, "events") == [120, 120, 130]  # + 10 released leases
    assert "10 message(s) being delivered: lease released" in done.stdout
    assert "\r" not in done.stderr  # no progress line without a terminal
    assert_same_queue(source.db, pg_url, before, after)
    assert_sequences_past(pg_url)


def test_rerun_of_a_finished_copy_copies_nothing(source: Spool, pg_url: str) -> None:
    assert copy(source, pg_url).returncode == 0
    again = copy(source, pg_url)
    assert again.returncode == 0, again.stderr
    assert "resumed an interrupted copy" in again.stdout
    assert counts_line(again.stdout, "messages") == [60, 0, 60]
    assert counts_line(again.stdout, "events") == [120, 0, 130]


def test_a_target_that_drops_rows_fails_the_count(source: Spool, pg_url: str) -> None:
    """Rows the target did not keep (here a trigger drops some) exit 1, naming them."""
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    engine.dispose()
    with psycopg.connect(libpq(pg_url)) as conn:
        conn.execute(
            "CREATE FUNCTION drop_rcpt() RETURNS trigger LANGUAGE plpgsql AS"
            " $$BEGIN IF NEW.kind = 'rcpt' THEN RETURN NULL; END IF; RETURN NEW; END$$"
        )
        conn.execute(
            "CREATE TRIGGER drop_rcpt BEFORE INSERT ON events"
            " FOR EACH ROW EXECUTE FUNCTION drop_rcpt()"
        )
    done = copy(source, pg_url)
    assert done.returncode == 1
    assert counts_line(done.stdout, "events") == [120, 120, 70]
    assert done.stderr.splitlines()[-1] == (
        "smapq: db copy: counts differ in the target: events 70 (expected 130)"
    )


def test_a_target_with_other_mail_is_refused(source: Spool, pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = make_spool(tmp_path / "other")
    fill(other.db, 3, seed=99)
    assert copy(other, pg_url).returncode == 0
    refused = copy(source, pg_url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "not an interrupted copy" in refused.stderr
    assert count_pg(pg_url, "messages") == 3


def test_a_source_changed_since_the_interrupted_copy_is_refused(
    source: Spool, pg_url: str
) -> None:
    assert copy(source, pg_url).returncode == 0
    conn = sqlite3.connect(source.db)
    with conn:
        conn.execute("UPDATE messages SET state = 'delivered', updated_at = 2e9 WHERE id = 1")
    conn.close()
    refused = copy(source, pg_url)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "source changed" in refused.stderr
    assert rows_pg(pg_url, "messages", "WHERE id = 1")[0][2] == "received"


def test_copy_errors_are_one_line(source: Spool, pg_url: str, tmp_path: Path) -> None:
    sqlite_target = copy(source, f"sqlite:///{tmp_path / 'x.db'}")
    assert sqlite_target.returncode == 64 and sqlite_target.stderr.count("\n") == 1
    gone = copy(source, pg_url.rsplit("/", 1)[0] + "/smapq_no_such_database")
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
    (source.directory / "smapq.db.damaged").write_text("2026-01-01 smapq db verify: bad page\n")
    damaged = copy(source, pg_url)
    assert damaged.returncode == 74 and "damaged" in damaged.stderr
    assert damaged.stderr.count("\n") == 1, damaged.stderr
    assert count_pg(pg_url, "messages") == 0
    source.db.unlink()
    missing = copy(source, pg_url)
    assert missing.returncode == 1 and "smapq init" in missing.stderr
    assert missing.stderr.count("\n") == 1


def test_from_names_the_queue_when_the_table_already_names_the_server(
    source: Spool, pg_url: str, tmp_path: Path
) -> None:
    table = tmp_path / "pg-table"
    table.write_text(source.table.read_text() + f"smap, smapd: database {pg_url}\n")
    table.chmod(0o600)
    done = subprocess.run(
        [
            program("smapq"),
            "-t",
            str(table),
            "db",
            "copy",
            "--from",
            str(source.db),
            "--to",
            pg_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert counts_line(done.stdout, "messages") == [60, 60, 60]


def test_progress_only_on_a_terminal(source: Spool, pg_url: str) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [program("smapq"), "-t", str(source.table), "db", "copy", "--to", pg_url, "--chunk", "5"],
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert proc.wait(timeout=120) == 0
    assert b"\rdb copy: messages " in seen and b"/60, events " in seen


def test_kill_9_mid_copy_then_rerun_loses_and_duplicates_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    spool = make_spool(tmp_path)
    fill(spool.db, 20_000)
    total = rows_sqlite(spool.db, "messages")
    before = time.time()
    # Killed while copying messages ...
    first = start_copy(spool, pg_url, "--chunk", "200")
    wait_for(lambda: count_pg(pg_url, "messages") > 0, what="first committed chunk")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    partial = count_pg(pg_url, "messages")
    assert 0 < partial < len(total)
    assert count_pg(pg_url, "recipients") == sum(1 + i % 3 for i in range(1, partial + 1))
    # ... and again while copying the events.
    second = start_copy(spool, pg_url, "--chunk", "200")
    wait_for(lambda: count_pg(pg_url, "events") > 0, what="first committed events")
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=60)
    assert count_pg(pg_url, "messages") == len(total)
    assert 0 < count_pg(pg_url, "events") < 40_000
    last = copy(spool, pg_url, "--chunk", "200")
    after = time.time()
    assert last.returncode == 0, last.stderr
    assert "resumed an interrupted copy" in last.stdout
    assert counts_line(last.stdout, "messages") == [20_000, 0, 20_000]
    n_rcpts = len(rows_sqlite(spool.db, "recipients"))
    assert counts_line(last.stdout, "recipients")[::2] == [n_rcpts, n_rcpts]
    released = sum(1 for r in total if r[2] == "delivering")
    assert counts_line(last.stdout, "events")[::2] == [40_000, 40_000 + released]
    assert_same_queue(spool.db, pg_url, before, after)
    assert_sequences_past(pg_url)
