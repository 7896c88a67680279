"""What a sendmail run means for the message: delivered, retry later, or bad.

Purpose: map one child result (exit status, signal, timeout, exec failure) to an
outcome, and compute the retry schedule (exponential backoff between ``minbackoff``
and ``maxbackoff``, give up after ``maxqueuetime``).

Standards: sysexits(3). Default retry codes 71 OSERR, 74 IOERR, 75 TEMPFAIL (Postfix
defers 71 and 75; 74 is added because a full or failing disk on the next hop is
temporary). A signal or a timeout is retried (Postfix bounces a timeout; we defer,
because a slow next hop is the usual cause). RFC 5321 4.5.4.1: retry for 4-5 days.

Security: none of its own; pure functions.
"""

from __future__ import annotations

import os
import signal

from smapq.errors import EX_OK

DELIVERED = "delivered"
RETRY = "retry"
BAD = "bad"

_SYSEXITS = {
    64: "EX_USAGE",
    65: "EX_DATAERR",
    66: "EX_NOINPUT",
    67: "EX_NOUSER",
    68: "EX_NOHOST",
    69: "EX_UNAVAILABLE",
    70: "EX_SOFTWARE",
    71: "EX_OSERR",
    72: "EX_OSFILE",
    73: "EX_CANTCREAT",
    74: "EX_IOERR",
    75: "EX_TEMPFAIL",
    76: "EX_PROTOCOL",
    77: "EX_NOPERM",
    78: "EX_CONFIG",
}


class ChildResult:
    """How one sendmail run ended, and what it printed (bounded)."""

    __slots__ = ("exec_error", "output", "signal", "status", "timed_out")

    def __init__(
        self,
        status: int | None = None,
        signal: int | None = None,
        timed_out: bool = False,
        exec_error: str | None = None,
        output: bytes = b"",
    ) -> None:
        self.status = status
        self.signal = signal
        self.timed_out = timed_out
        self.exec_error = exec_error
        self.output = output

    def describe(self) -> str:
        """One line for last_result, the event and the log."""
        if self.exec_error is not None:
            head = self.exec_error
        elif self.timed_out:
            head = "timed out, killed"
        elif self.signal is not None:
            head = f"killed by signal {signal_name(self.signal)}"
        else:
            status = self.status if self.status is not None else -1
            name = _SYSEXITS.get(status)
            head = f"exit {status}" + (f" ({name})" if name else "")
        text = self.output.decode("utf-8", "replace").strip()
        if text:
            flat = " | ".join(line.strip() for line in text.splitlines() if line.strip())
            return f"{head}: {flat}"
        return head


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def classify(result: ChildResult, retrycodes: frozenset[int]) -> str:
    """DELIVERED, RETRY or BAD for one sendmail run."""
    if result.exec_error is not None or result.timed_out or result.signal is not None:
        return RETRY
    if result.status == EX_OK:
        return DELIVERED
    if result.status in retrycodes:
        return RETRY
    return BAD


def backoff(attempts: int, minbackoff: int, maxbackoff: int) -> float:
    """Delay before the next try after ``attempts`` failed ones (1, 2, ...).

    minbackoff, 2x, 4x, ... capped at maxbackoff (Postfix's minimal/maximal backoff).
    """
    exponent = min(max(attempts - 1, 0), 32)
    return float(min(maxbackoff, minbackoff * (2**exponent)))


def next_attempt(
    now: float,
    received_at: float,
    attempts: int,
    minbackoff: int,
    maxbackoff: int,
    maxage: int,
    held: float = 0.0,
) -> float | None:
    """When to try again after a temporary failure, or None: give up (too old).

    The age is the time in the queue minus ``held``, the time spent on hold: held
    mail does not expire while held (Postfix's rule for ``postsuper -h``), and after
    its release it has the rest of its ``maxqueuetime``, neither more nor less. The
    last try is moved to the deadline itself, so a message gets its full
    ``maxqueuetime`` before it is declared bad.
    """
    deadline = received_at + held + maxage
    if now >= deadline:
        return None
    return min(now + backoff(attempts, minbackoff, maxbackoff), deadline)


def near_deadline(
    now: float, received_at: float, attempts: int, minbackoff: int, maxbackoff: int, maxage: int
) -> bool:
    """Whether time spent on hold could change ``next_attempt`` (it can only move the
    deadline later): only then is it worth looking up."""
    return now + backoff(attempts, minbackoff, maxbackoff) > received_at + maxage


def exec_problem(path: str) -> str | None:
    """Why ``path`` cannot be run as the delivery program, or None if it looks runnable."""
    if not os.path.exists(path):
        return f"sendmail program {path} does not exist"
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return f"sendmail program {path} is not executable"
    return None
