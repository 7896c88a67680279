"""Error classes shared by every smapq program.

Errors say whether to retry: ``TempError`` carries the SMTP reply a client should see
and maps to EX_TEMPFAIL; ``ConfigError`` names file, line and keyword and maps to
EX_CONFIG.
The CLI turns any ``SmapqError`` into one line on stderr and the class's exit code.
"""

from __future__ import annotations

# sysexits(3), the codes sendmail, inetd and init systems understand.
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOUSER = 67
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_OSFILE = 72
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78


class SmapqError(Exception):
    """Root of every error smapq reports to a person instead of a traceback."""

    exit_code = 1

    def __init__(self, message: str = "", exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(SmapqError):
    """A command was called with arguments that cannot work (unknown id, bad date)."""

    exit_code = EX_USAGE


class ConfigError(SmapqError):
    """A netperm-table problem, located as ``file:line: keyword: message``."""

    exit_code = EX_CONFIG

    def __init__(self, message: str, path: str = "", line: int = 0, keyword: str = "") -> None:
        self.path = path
        self.line = line
        self.keyword = keyword
        self.reason = message
        where = path
        if line:
            where = f"{path}:{line}"
        parts = [p for p in (where, keyword, message) if p]
        super().__init__(": ".join(parts))


class TempError(SmapqError):
    """A failure worth retrying later; carries the SMTP reply for a client."""

    exit_code = EX_TEMPFAIL

    def __init__(self, message: str, reply: bytes = b"451 4.3.0 Temporary failure") -> None:
        super().__init__(message)
        self.reply = reply


class PrivilegeError(SmapqError):
    """The process cannot take or drop the privileges its configuration asks for."""

    exit_code = EX_NOPERM
