"""SIGTERM, SIGINT and SIGHUP for the deliverer, read from a self-pipe.

Purpose: signals are read from a pipe (``signal.set_wakeup_fd``), not acted on in
Python handlers: CPython runs handlers only in the main thread, and a signal the
kernel hands to a worker thread can sit unnoticed while the main thread waits (seen
as a lost SIGTERM under load). The C-level handler writes the signal number to the
pipe at once, whichever thread took it; the loop polls the pipe every tick and
sleeps on it between passes (inbox.py), and ``wait`` sleeps on it, so a stop request
ends even a long back-off at once. (The loss once blamed on a worker thread taking the
signal was most likely the main thread stuck in ``SimpleQueue.get``: see inbox.py.)

service.run blocks these signals until ``install``; one that came meanwhile is
delivered when ``install`` unblocks them. ``restore`` puts the signal mask back first,
so in service.run a stop request that comes after the loop has returned stays
pending (the process is stopping anyway) instead of meeting the dispositions the
process started with (SIGTERM's default kills it, SIGINT's raises KeyboardInterrupt:
no exit status 0 after an orderly stop).
"""

from __future__ import annotations

import os
import select
import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _noted(_signum: int, _frame: FrameType | None) -> None:
    """Python-level handler: nothing to do, the wakeup pipe carries the signal."""


class SignalPipe:
    """Counts stop requests and notes reload requests."""

    def __init__(self) -> None:
        self.stops = 0
        self.hup = False
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup = -1
        self._old: dict[int, Any] = {}
        self._old_mask: set[int | signal.Signals] | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._old_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            self._old[signum] = signal.signal(signum, _noted)
        self._old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def fileno(self) -> int | None:
        """The pipe a signal makes readable (None when not installed)."""
        return None if self._pipe is None else self._pipe[0]

    def restore(self) -> None:
        if self._old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
            self._old_mask = None
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old = {}
        if self._pipe is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def poll(self) -> None:
        if self._pipe is None:
            return
        try:
            got = os.read(self._pipe[0], 512)
        except BlockingIOError:
            return
        for signum in got:
            if signum == signal.SIGHUP:
                self.hup = True
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stops += 1

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less if a signal arrives."""
        if self._pipe is None:
            select.select([], [], [], seconds)
        else:
            select.select([self._pipe[0]], [], [], seconds)
        self.poll()
