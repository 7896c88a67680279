"""Where the receiver's log lines go: syslog, the ``logfile`` keyword, a fallback file.

Purpose: one sink for both transports (inetd ``smap`` and ``smapq serve``), opened
before the jail.  Lines go to syslog (ident ``smap``, facility mail, LOG_NDELAY so the
/dev/log socket survives the chroot) when /dev/log exists, and to ``smap: logfile``
when the table names one (Postfix's maillog_file, for containers without syslog).
A failure before the banner -- a bad netperm-table above all -- is also appended to
FALLBACK_LOG when neither is available, so the admin finds the reason somewhere other
than in a client's ``421``.

Security: files are opened as root before the jail, append-only, mode 0640, never
through a symlink (O_NOFOLLOW); the jailed receiver only holds the descriptor.

Lean: stdlib only.
"""

from __future__ import annotations

import os
import syslog
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

FALLBACK_LOG = "/var/log/smap.log"
_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class LogSink:
    """A callable ``sink(priority, text)`` writing to syslog and/or an open file."""

    __slots__ = ("fd", "ident", "syslog_on")

    def __init__(self, ident: str = "smap") -> None:
        self.ident = ident
        self.fd = -1
        self.syslog_on = os.path.exists("/dev/log")
        time.localtime()  # loads the zone file now: the jail has no /etc/localtime
        if self.syslog_on:
            syslog.openlog(ident, syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_MAIL)

    @property
    def active(self) -> bool:
        return self.syslog_on or self.fd >= 0

    def open_file(self, path: str) -> None:
        """Also write to ``path``; raises OSError when it cannot be opened."""
        fd = os.open(path, _FILE_FLAGS, 0o640)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def __call__(self, priority: int, text: str) -> None:
        if self.syslog_on:
            syslog.syslog(priority, text)
        if self.fd >= 0:
            self._write(self.fd, text)

    def _write(self, fd: int, text: str) -> None:
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
        line = f"{stamp} {os.uname().nodename} {self.ident}[{os.getpid()}]: {text}\n"
        try:  # noqa: SIM105  (contextlib is an import the receiver need not pay)
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass

    def failure(self, priority: int, text: str) -> None:
        """A failure before the banner: logged, and never lost for want of a log."""
        if self.active:
            self(priority, text)
            return
        try:
            fd = os.open(FALLBACK_LOG, _FILE_FLAGS, 0o640)
        except OSError:
            return
        try:
            self._write(fd, text)
        finally:
            os.close(fd)


def sink_or_none(sink: LogSink) -> Callable[[int, str], None] | None:
    """The sink for the intake core, or None when nothing would be written."""
    return sink if sink.active else None


def crash_report(exc: BaseException) -> str:
    """The stack as one line, without importing traceback (the jail hides its source)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}:{code.co_name}")
        tb = tb.tb_next
    where = " < ".join(reversed(frames))
    return f"fwtksyserr: internal error {type(exc).__name__}: {exc} at {where}"
