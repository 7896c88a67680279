"""Times and durations as operators type them, and as reports print them.

Purpose: ``--since``/``--until`` accept an ISO 8601 date or date-time (UTC unless it
carries an offset) or a relative age such as ``90m``, ``1h``, ``7d``, ``2w`` meaning
"that long before now"; ``--older-than`` takes the same durations. The database keeps
float epoch seconds (UTC); tables print UTC times, JSON prints ISO 8601 with ``Z``.

Diagnostics: a value that is neither raises ``UsageError`` naming the option.
"""

from __future__ import annotations

import datetime as dt
import re

from smapq.errors import UsageError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


# Longer ages only overflow the platform's time_t when printed; no mail is that old.
MAX_DURATION = 100 * 365 * 86400


def parse_duration(text: str, option: str = "duration") -> float:
    """Seconds in ``30s``, ``15m``, ``1h``, ``7d`` or ``2w`` (at most 100 years)."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"{option}: {text!r} is not a duration like 30m, 1h, 7d or 2w")
    seconds = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if seconds > MAX_DURATION:
        raise UsageError(f"{option}: {text!r} is longer than 100 years")
    return seconds


def parse_when(text: str, now: float, option: str = "time") -> float:
    """Epoch seconds for an ISO date/date-time (UTC by default) or an age before now."""
    if _DURATION.match(text):
        return now - parse_duration(text, option)
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option}: {text!r} is neither an ISO date (2026-11-25, 2026-11-25T09:30) "
            "nor an age (1h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def window(since: str | None, until: str | None, now: float) -> tuple[float | None, float | None]:
    """The half-open window [since, until) from the two options; checks the order."""
    lo = parse_when(since, now, "--since") if since else None
    hi = parse_when(until, now, "--until") if until else None
    if lo is not None and hi is not None and lo >= hi:
        raise UsageError(f"--since {since} is not before --until {until}")
    return lo, hi


def day(text: str, now: float, option: str = "--day") -> tuple[float, float]:
    """[start, end) of one UTC day: ``today``, ``yesterday`` or ``2026-11-25``."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    word = text.strip().lower()
    if word in ("today", "yesterday"):
        date = today - dt.timedelta(days=1 if word == "yesterday" else 0)
    else:
        try:
            date = dt.date.fromisoformat(text.strip())
        except ValueError:
            raise UsageError(
                f"{option}: {text!r} is not today, yesterday or a date like 2026-11-25"
            ) from None
    start = dt.datetime(date.year, date.month, date.day, tzinfo=dt.UTC).timestamp()
    return start, start + 86400


def iso(epoch: float | None) -> str | None:
    """ISO 8601 UTC with a Z, to the second (the stable JSON form)."""
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def short_time(epoch: float | None) -> str:
    """``2026-11-25 09:30`` in UTC, for tables."""
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M")


def long_time(epoch: float) -> str:
    """``2026-11-25 09:30:12`` in UTC: a time to the second, for ``report sql``."""
    try:
        return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return repr(epoch)  # not a time after all: show the number


def human_duration(seconds: float | None) -> str:
    """Two most significant units: ``45s``, ``5m12s``, ``3h05m``, ``4d02h``."""
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        return f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{sign}{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{int(value)}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)  # pragma: no cover
