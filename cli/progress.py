"""Progress of long verbs (purge, import-spool, and any later copy or recover) for people.

One status line on stderr, rewritten in place, only when stderr is a terminal: cron,
pipes and log files get nothing but the verb's result lines, as from Postfix's tools.
Updates are throttled to a few per second; ``done()`` erases the line so the verb's
own summary starts on a clean line.

Use: ``with Progress("purge") as show: ... show(f"{n} messages")``.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

INTERVAL = 0.2


class Progress:
    """A throttled, self-erasing status line; silent unless ``stream`` is a TTY."""

    def __init__(self, verb: str, stream: TextIO | None = None) -> None:
        self.verb = verb
        self.stream = stream if stream is not None else sys.stderr
        self.on = self.stream.isatty()
        self.shown = False
        self._last = -INTERVAL

    def __call__(self, text: str, final: bool = False) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not final and now - self._last < INTERVAL:
            return
        self._last = now
        # \r back to column 0, ESC [K erases the rest of a longer earlier line.
        self.stream.write(f"\r{self.verb}: {text}\x1b[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.done()
