"""A queue database with a known mix of messages and envelope events, for report tests.

The spool is made by the installed ``smapq init`` (the shared ``spool`` fixture); rows go
in through the store API (``queries.insert_message``), and the columns only a deliverer
sets (attempts, leases, delivered_at, ...) are set with plain UPDATEs, as a deliverer
would leave them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pty
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from smapq.store import queries
from smapq.store.engine import make_engine

HOUR = 3600.0
DAY = 86400.0


class Filled:
    """The spool, its writable engine, the reference time and the messages' queue ids."""

    def __init__(self, spool: Any, now: float) -> None:
        self.spool = spool
        self.now = now
        self.engine: Engine = make_engine(spool.target)

    def smapq(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result: subprocess.CompletedProcess[str] = self.spool.smapq(*args, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"smapq {' '.join(args)} exited {result.returncode}: {result.stderr}"
            )
        return result

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.smapq(*args, "--format", "json").stdout)
        return out

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything a verb could change, to prove that nothing did."""
        with self.engine.connect() as conn:
            return tuple(
                tuple(tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY id")))
                for t in ("messages", "recipients", "events")
            )


def add(
    conn: Any,
    qid: str,
    *,
    received_at: float,
    sender: str,
    rcpts: list[str],
    client: str | None = "192.0.2.1",
    name: str | None = "mx1.a.example",
    size: int = 100,
    body: bytes | None = None,
    state: str = "received",
    **update: Any,
) -> None:
    data = (
        body
        if body is not None
        else b"Subject: test %s\r\nFrom: x\r\n\r\nhello\r\n" % qid.encode()
    )
    queries.insert_message(
        conn,
        {
            "queue_id": qid,
            "state": state,
            "received_at": received_at,
            "session_id": f"S-{qid}",
            "client_addr": client,
            "client_name": name,
            "helo": name,
            "protocol": "ESMTP",
            "mail_from": sender,
            "size": size,
            "trace": f"Received: from {name} ([{client}])\r\n\tid {qid}\r\n",
            "body": data,
            "body_sha256": hashlib.sha256(data).hexdigest(),
        },
        rcpts,
        [
            {
                "at": received_at - 1,
                "kind": "connect",
                "session_id": f"S-{qid}",
                "client_addr": client,
                "code": 220,
            },
            {
                "at": received_at,
                "kind": "accept",
                "session_id": f"S-{qid}",
                "queue_id": qid,
                "client_addr": client,
                "code": 250,
            },
        ],
    )
    if update:
        sets = ", ".join(f"{k} = :{k}" for k in update)
        conn.execute(
            text(f"UPDATE messages SET {sets} WHERE queue_id = :qid"), {**update, "qid": qid}
        )


def fill(engine: Engine, now: float) -> None:
    with engine.begin() as c:
        add(
            c,
            "M1",
            received_at=now - 2 * HOUR,
            sender="alice@a.example",
            rcpts=["bob@b.example", "carol@c.example"],
            size=100,
            state="delivered",
            delivered_at=now - 2 * HOUR + 10,
            attempts=1,
        )
        add(
            c,
            "M2",
            received_at=now - 3 * DAY,
            sender="alice@a.example",
            rcpts=["bob@b.example"],
            size=200,
            state="delivered",
            delivered_at=now - 3 * DAY + 100,
            attempts=1,
        )
        add(
            c,
            "M3",
            received_at=now - 30 * 60,
            sender="dave@d.example",
            rcpts=["erin@e.example"],
            client="192.0.2.2",
            name="mx.d.example",
            size=300,
            attempts=2,
            next_attempt_at=now + 600,
            last_exit=75,
            last_result="451 4.3.0 try again later",
        )
        add(
            c,
            "M4",
            received_at=now - 2 * DAY,
            sender="",
            rcpts=["frank@f.example"],
            client="192.0.2.3",
            name="mx.f.example",
            size=400,
            state="bad",
            attempts=5,
            updated_at=now - 20 * HOUR,
            last_exit=67,
            last_result="550 5.1.1 user unknown",
        )
        add(
            c,
            "M5",
            received_at=now - 10 * 60,
            sender="alice@a.example",
            rcpts=["bob@b.example"],
            size=500,
            state="held",
        )
        add(
            c,
            "M6",
            received_at=now - 5 * 60,
            sender="gina@g.example",
            rcpts=["hal@b.example"],
            size=600,
            state="delivering",
            attempts=1,
            lease_owner="test:1",
            lease_expires_at=now + 3600,
        )
        add(
            c,
            "M7",
            received_at=now - 6 * 60,
            sender="gina@g.example",
            rcpts=["ivan@b.example"],
            size=700,
            state="delivering",
            attempts=1,
            lease_owner="test:2",
            lease_expires_at=now - 3600,
        )
        add(
            c,
            "M8",
            received_at=now - 60,
            sender="judy@j.example",
            rcpts=["kim@b.example", "-oQ@evil.example"],
            size=800,
        )
        queries.insert_events(
            c,
            [
                {"at": now - 20 * HOUR, "kind": "bad", "queue_id": "M4", "code": 67},
                {"at": now - 2 * HOUR + 10, "kind": "delivered", "queue_id": "M1", "code": 0},
                {"at": now - 3 * DAY + 100, "kind": "delivered", "queue_id": "M2", "code": 0},
            ],
        )
        # An abusive client: three sessions, two refused recipients, VRFY, EXPN, a timeout.
        bad = "198.51.100.7"
        log: list[dict[str, Any]] = []
        for i in range(3):
            log.append(
                {
                    "at": now - HOUR + i,
                    "kind": "connect",
                    "session_id": f"X{i}",
                    "client_addr": bad,
                    "code": 220,
                }
            )
        log += [
            {
                "at": now - HOUR + 5,
                "kind": "reject",
                "session_id": "X0",
                "client_addr": bad,
                "address": "alice@a.example",
                "code": 554,
                "detail": "RCPT TO:<alice@a.example>: 554 5.7.1 relay access denied",
            },
            {
                "at": now - HOUR + 6,
                "kind": "reject",
                "session_id": "X0",
                "client_addr": bad,
                "address": "alice@a.example",
                "code": 554,
                "detail": "RCPT TO:<alice@a.example>: 554 5.7.1 relay access denied",
            },
            {
                "at": now - HOUR + 7,
                "kind": "vrfy",
                "session_id": "X1",
                "client_addr": bad,
                "code": 252,
                "detail": "VRFY root",
            },
            {
                "at": now - HOUR + 8,
                "kind": "expn",
                "session_id": "X1",
                "client_addr": bad,
                "code": 502,
                "detail": "EXPN staff",
            },
            {
                "at": now - HOUR + 9,
                "kind": "timeout",
                "session_id": "X2",
                "client_addr": bad,
                "code": 421,
            },
        ]
        queries.insert_events(c, log)


def on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (as at a shell prompt), stdout on a pipe."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode()


@pytest.fixture
def filled(spool: Any) -> Filled:
    f = Filled(spool, time.time())
    fill(f.engine, f.now)
    return f
