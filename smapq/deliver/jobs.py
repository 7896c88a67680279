"""What moves between the deliverer's parts: a claimed message (Job), a worker's
verdict on it (Verdict), and the run's tally.

Purpose: plain data with no behaviour of its own, so the claims, the workers and the
outcome recorder share one vocabulary and none imports another.

Security: every field of a Job comes from a queue row, i.e. from the network; it is
checked before it becomes argv (command.py) and only ever reaches sendmail's stdin.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from smapq.config.settings import SmapdSettings
from smapq.deliver import policy

# Verdict kinds beyond policy's DELIVERED / RETRY / BAD.
SENT = "sent"  # a non-final batch was accepted; commit sent_at, then go on
RELEASE = "release"  # aborted at shutdown: back to received, attempt not counted
CRASHED = "crashed"  # tally only: an outcome fenced off because the lease was lost
UNREADABLE = "unreadable"  # tally only: a row the database could not read or write


def new_owner() -> str:
    """A lease owner name unique to this process: host, pid and some randomness."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}:{os.urandom(4).hex()}"


class Job:
    """One claimed message on its way through a worker."""

    __slots__ = (
        "abort",
        "ack",
        "ack_ok",
        "attempts",
        "body_sha256",
        "data",
        "id",
        "key",
        "mail_from",
        "next_attempt_at",
        "queue_id",
        "rcpts",
        "received_at",
        "settings",
        "started",
        "token",
        "trace_len",
    )

    def __init__(self, row: Any, rcpts: list[tuple[int, str]], settings: SmapdSettings) -> None:
        """Raises TypeError/ValueError/AttributeError on a row with impossible values."""
        self.id = int(row.id)
        self.token = int(row.lease_token)
        self.key = (self.id, self.token)
        self.queue_id = str(row.queue_id)
        self.mail_from = _text(row.mail_from)
        self.received_at = float(row.received_at)
        self.attempts = int(row.attempts)
        self.next_attempt_at = float(row.next_attempt_at)
        trace = _text(row.trace or "").encode("utf-8", "surrogateescape")
        self.trace_len = len(trace)
        self.data: bytes | None = None if row.body is None else trace + bytes(row.body)
        self.body_sha256 = None if row.body_sha256 is None else str(row.body_sha256)
        self.rcpts = rcpts
        self.settings = settings
        self.abort = threading.Event()
        self.ack = threading.Event()
        self.ack_ok = False
        self.started: list[float] = []

    @classmethod
    def damaged(cls, row: Any, settings: SmapdSettings) -> Job | None:
        """A Job for a row whose id and lease token are readable but whose other values
        are impossible: enough to record it as bad, never enough to send it."""
        try:
            mid, token, qid = int(row.id), int(row.lease_token), str(row.queue_id)
        except (TypeError, ValueError, AttributeError):
            return None
        job = cls.__new__(cls)
        job.id, job.token, job.key, job.queue_id = mid, token, (mid, token), qid
        job.mail_from, job.rcpts, job.settings, job.data = "", [], settings, None
        job.body_sha256, job.trace_len, job.started = None, 0, []
        job.abort, job.ack, job.ack_ok = threading.Event(), threading.Event(), False
        job.received_at = _number(row, "received_at", 0.0)
        job.next_attempt_at = _number(row, "next_attempt_at", 0.0)
        job.attempts = int(_number(row, "attempts", 0))
        return job

    def values(
        self,
        state: str,
        attempts: int,
        next_attempt_at: float | None = None,
        delivered_at: float | None = None,
    ) -> dict[str, Any]:
        """The message columns an outcome writes (queries.FINISH_COLUMNS)."""
        return {
            "state": state,
            "attempts": attempts,
            "next_attempt_at": next_attempt_at or self.next_attempt_at,
            "delivered_at": delivered_at,
        }


def _number(row: Any, name: str, default: float) -> float:
    try:
        return float(getattr(row, name))
    except (TypeError, ValueError, AttributeError):
        return default


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text, found {type(value).__name__}")
    return value


class Verdict:
    """What a worker reports: the kind, the exit code, a text, the recipients concerned."""

    __slots__ = ("code", "kind", "rcpt_ids", "text")

    def __init__(
        self, kind: str, text: str, code: int | None = None, rcpt_ids: list[int] | None = None
    ) -> None:
        self.kind = kind
        self.text = text
        self.code = code
        self.rcpt_ids = rcpt_ids or []


class Tally:
    """Outcomes of one run (``--once`` turns them into its exit code)."""

    __slots__ = ("bad", "deferred", "delivered", "lost", "released", "unreadable")

    def __init__(self) -> None:
        self.delivered = 0
        self.deferred = 0
        self.bad = 0
        self.lost = 0
        self.released = 0
        self.unreadable = 0

    def count(self, kind: str) -> None:
        name = {policy.RETRY: "deferred", RELEASE: "released", CRASHED: "lost"}.get(kind, kind)
        setattr(self, name, getattr(self, name) + 1)

    def __str__(self) -> str:
        return " ".join(f"{k}={getattr(self, k)}" for k in self.__slots__)
