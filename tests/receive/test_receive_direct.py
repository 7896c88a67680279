"""The installed smap started directly (no super-server): options, refusals, $REMOTE_ADDR."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from smapq.errors import EX_CONFIG, EX_TEMPFAIL, EX_USAGE
from tests.conftest import program
from tests.receive.conftest import spool_for_receiver

pytestmark = pytest.mark.integration

# A whole session on a pipe arrives at once, as no client may send it over SMTP without
# PIPELINING: these tests are about other things, so their tables allow it.
PIPE = "smap: strictpipelining off\n"

SEED = b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"


def smap(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [program("smap"), *args], input=stdin, capture_output=True, timeout=120, env=env or {}
    )


def test_help_and_usage() -> None:
    done = smap("--help")
    assert done.returncode == 0
    assert done.stdout.startswith(b"usage: smap [-t netperm-table]")
    done = smap("--bogus")
    assert done.returncode == EX_USAGE
    assert b"unknown argument '--bogus'" in done.stderr
    assert done.stdout == b""


def test_bad_table_is_421_and_exit_78(tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_text("smap: maxrecip many\n")
    table.chmod(0o600)
    done = smap("-t", str(table), stdin=b"QUIT\r\n")
    assert done.stdout.startswith(b"421 4.3.0 ")
    assert done.returncode == EX_CONFIG
    assert b"fwtkcfgerr: " in done.stderr and b":1: maxrecip: " in done.stderr


def test_table_writable_by_others_is_refused(tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_text("smap: jail off\n")
    table.chmod(0o666)
    done = smap("-t", str(table))
    assert done.returncode == EX_CONFIG
    assert b"writable by group or others" in done.stderr


def test_a_url_of_another_database_is_refused(open_dir: Path) -> None:
    # PostgreSQL URLs are served (tests/receive/test_pg_intake.py); others are not.
    spool = spool_for_receiver(open_dir)
    with spool.table.open("a") as table:
        table.write("smap: database mysql://db/smapq\n")
    done = smap("-t", str(spool.table), stdin=b"QUIT\r\n")
    assert done.stdout.startswith(b"421 4.3.0 ")
    assert done.returncode == EX_TEMPFAIL
    assert b"mysql://" in done.stderr


def test_remote_addr_from_the_environment(open_dir: Path) -> None:
    spool = spool_for_receiver(open_dir, PIPE)
    done = smap(
        "-t", str(spool.table), stdin=SEED, env={"REMOTE_ADDR": "192.0.2.7", "REMOTE_PORT": "4242"}
    )
    assert done.returncode == 0, done.stderr
    assert b"250 Mail accepted, queued as " in done.stdout
    with sqlite3.connect(spool.db) as db:
        assert db.execute("SELECT client_addr, client_port FROM messages").fetchall() == [
            ("192.0.2.7", 4242)
        ]
        assert db.execute("SELECT DISTINCT client_addr FROM events").fetchall() == [("192.0.2.7",)]


@pytest.mark.parametrize(
    ("remote", "stored", "literal"),
    [
        ("2001:db8::7", "2001:db8::7", "[IPv6:2001:db8::7]"),
        ("::ffff:192.0.2.8", "192.0.2.8", "[192.0.2.8]"),
        ("192.0.2.9\r\nX-Injected: yes", None, "[unknown]"),
        ("not an address", None, "[unknown]"),
    ],
)
def test_remote_addr_is_an_ip_address_or_nothing(
    open_dir: Path, remote: str, stored: str | None, literal: str
) -> None:
    spool = spool_for_receiver(open_dir, PIPE)
    done = smap("-t", str(spool.table), stdin=SEED, env={"REMOTE_ADDR": remote})
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(spool.db) as db:
        ((addr, trace),) = db.execute("SELECT client_addr, trace FROM messages").fetchall()
    assert addr == stored
    assert trace.startswith(f"Received: from c (unknown {literal})\r\n\tby ")
    assert "Injected" not in trace


def test_smap_table_from_environment(open_dir: Path) -> None:
    spool = spool_for_receiver(open_dir, PIPE)
    done = smap(stdin=SEED, env={"SMAPQ_TABLE": str(spool.table)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"220 ")


def test_broken_schema_is_451_not_a_traceback(open_dir: Path) -> None:
    spool = spool_for_receiver(open_dir, PIPE)
    with sqlite3.connect(spool.db) as db:
        db.execute("DROP TABLE recipients")
    done = smap("-t", str(spool.table), stdin=SEED)
    assert done.returncode == 0
    lines = done.stdout.split(b"\r\n")
    assert b"451 Error: queue file write error, try again later" in lines  # HELO: plain
    assert lines[-2] == b"221 Closing connection"
    assert b"Traceback" not in done.stdout + done.stderr
    with sqlite3.connect(spool.db) as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (0,)
        assert db.execute(
            "SELECT code, detail LIKE '%no such table: recipients%' FROM events"
            " WHERE kind = 'reject'"
        ).fetchall() == [(451, 1)]


def test_null_sender_is_stored_alike_in_messages_and_every_event(open_dir: Path) -> None:
    """<> is '' in messages.mail_from, so in every event too (the reports match them)."""
    spool = spool_for_receiver(open_dir, PIPE + "smap: maxbytes 2048\n")
    dialogue = (
        b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\n"
        b"MAIL FROM:<> SIZE=4096\r\nMAIL FROM:<> FOO=1\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nbare\nLF\r\n.\r\nQUIT\r\n"
    )
    done = smap("-t", str(spool.table), stdin=dialogue)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(spool.db) as db:
        assert db.execute("SELECT mail_from FROM messages").fetchall() == [("",)]
        events = db.execute(
            "SELECT kind, code, address FROM events WHERE kind IN ('mail', 'accept', 'reject')"
            " ORDER BY id"
        ).fetchall()
    assert events == [
        ("mail", 250, ""),
        ("accept", 250, ""),
        ("reject", 552, ""),
        ("reject", 555, ""),
        ("mail", 250, ""),
        ("reject", 550, ""),
    ]


def test_helo_names_are_details_not_addresses(open_dir: Path) -> None:
    spool = spool_for_receiver(open_dir, PIPE)
    done = smap("-t", str(spool.table), stdin=b"HELO\r\nHELO a\x01b\r\nEHLO c.example\r\nQUIT\r\n")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(spool.db) as db:
        events = db.execute(
            "SELECT kind, code, address, detail FROM events WHERE kind IN ('helo', 'reject')"
            " ORDER BY id"
        ).fetchall()
    assert events == [
        ("reject", 501, None, "HELO syntax"),
        ("reject", 501, None, "HELO syntax: a?b"),
        ("helo", 250, None, "EHLO c.example"),
    ]
