"""The workers' verdicts on their way to the main thread, and the main thread's sleep.

Purpose: the main thread sleeps between passes until a worker reports, a signal
arrives, or the tick is up. It sleeps in ``poll`` on two pipes: this inbox's doorbell
(a worker writes a byte after each ``put``) and the signal pipe (signals.py).

Why not ``queue.SimpleQueue.get(timeout=...)``: in CPython (seen on 3.11) a signal
that interrupts that wait runs the handler and then recomputes the timeout; when the
deadline has passed meanwhile -- the thread was not scheduled again within the tick,
as on a loaded machine -- the new timeout is negative, which the lock takes as "wait
forever". The main thread then slept until a worker reported, and an idle daemon
never acted on the SIGTERM whose byte sat in the signal pipe. ``poll`` recomputes
its timeout after a signal and treats a passed deadline as "time is up" (PEP 475).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """A queue any thread may ``put`` to; the main thread takes from it."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[T] = queue.SimpleQueue()
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._bell: tuple[int, int] | None = (read_fd, write_fd)

    def put(self, item: T) -> None:
        self._items.put(item)
        # After the put: a waiter that hears the bell finds the item.
        bell = self._bell
        if bell is not None:
            # Full: the bell has rung often enough, the waiter will wake.
            with contextlib.suppress(BlockingIOError):
                os.write(bell[1], b"\0")

    def get_nowait(self) -> T:
        """The next item; ``queue.Empty`` when there is none."""
        return self._items.get_nowait()

    def wait(self, seconds: float, also: int | None = None) -> None:
        """Sleep up to ``seconds``, less when an item comes or ``also`` turns readable."""
        bell = self._bell
        if bell is None:
            return
        poller = select.poll()
        poller.register(bell[0], select.POLLIN)
        if also is not None:
            poller.register(also, select.POLLIN)
        poller.poll(max(0.0, seconds) * 1000.0)
        # Silence the bell before the caller drains the items: an item put after the
        # drain rings again, so no report is slept through.
        with contextlib.suppress(BlockingIOError):
            while os.read(bell[0], 4096):
                pass

    def close(self) -> None:
        """Release the doorbell; only when no thread can ``put`` any more."""
        bell, self._bell = self._bell, None
        if bell is not None:
            for fd in bell:
                os.close(fd)
