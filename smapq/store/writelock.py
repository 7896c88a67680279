"""One SQLite writer at a time, across processes, in arrival order.

Purpose: every process that writes the queue file (inetd receivers, ``smapq serve``
workers, the deliverer, admin verbs) takes an exclusive flock(2) on the database's
directory around each write transaction.  Without it the writers meet in SQLite's busy
handler, which sleeps and polls with growing steps: under fifty receivers and a
deliverer one writer can sleep past its busy timeout while others keep taking the
lock ("database is locked", 451), and two busy processes stall each other up to half a
second.  The kernel queues flock waiters and wakes one when the lock is released, so
writers take turns instead.  SQLite's own locking still guards the file; the busy
timeout stays as the backstop for writers that do not take this lock (sqlite3 CLI).

Security: the directory is the spool (or the database's directory inside it): the
processes that may write the queue can open it, nobody else can.  flock locks belong to
the open file description, so closing other descriptors (SQLite's POSIX-lock pitfall)
cannot drop it.  The descriptor is close-on-exec: sendmail never inherits it.

Diagnostics: ``LockTimeout`` when ``acquire(timeout)`` ran out (main thread only: the
wait is cut by an interval timer, as a blocking flock cannot time out by itself).

Lean: stdlib C modules only; the inetd receiver imports it.
"""

from __future__ import annotations

import fcntl
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The C module behind ``signal`` (which imports enum), loaded on the first timed wait:
# most acquisitions never wait.
_signal: Any = None


class LockTimeout(Exception):
    """The write lock was not granted in time."""


def _expired(signum: int, frame: object) -> None:
    raise LockTimeout


class WriteLock:
    """The exclusive write lock of the queue database in ``directory``."""

    __slots__ = ("fd", "held")

    def __init__(self, directory: str) -> None:
        self.fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.held = False

    def acquire(self, timeout: float | None = None) -> None:
        """Wait for the lock; ``timeout`` seconds at most (in the main thread; other
        threads wait without a bound)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if timeout is None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                self._timed_wait(timeout)
        self.held = True

    def _timed_wait(self, timeout: float) -> None:
        global _signal  # noqa: PLW0603
        if _signal is None:
            import _signal as module  # type: ignore[import-not-found]  # noqa: PLC0415

            _signal = module
        sig = _signal
        try:
            old = sig.signal(sig.SIGALRM, _expired)
        except ValueError:  # not the main thread: signals cannot cut the wait short
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return
        sig.setitimer(sig.ITIMER_REAL, timeout)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        finally:
            sig.setitimer(sig.ITIMER_REAL, 0)
            sig.signal(sig.SIGALRM, old)

    def release(self) -> None:
        if self.held:
            self.held = False
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self.release()
        os.close(self.fd)
