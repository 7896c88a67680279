"""The key table: every netperm-table keyword smap and smapd understand, declared once.

Purpose: one row per keyword with its programs, type, default, bounds and meaning, like
Postfix's ``mail_params.h``. ``settings.py`` applies the table; ``check-config`` and the
README print it; nothing else knows a keyword's default.

FWTK keywords keep their meaning (smap: userid groupid directory timeout maxbytes
maxrecip; smapd: userid groupid directory sendmail baddir wakeup maxchildren executable).
Where FWTK had no limit (timeout, maxbytes, maxrecip) smapq has a safe default, because
an unbounded body is held in memory and stored as one row; each is still settable.
Every keyword takes exactly one argument, as in FWTK, except the access policy's
``domains`` (names and files) and ``rule`` (four words), whose every line counts
(``multi``): see smapq.config.policy.

Lean: imported by the inetd receiver; stdlib only.
"""

from __future__ import annotations

import grp
import os
import pwd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from smapq.config.netperm import Rule

SMAP = "smap"
SMAPD = "smapd"
PROGRAMS = (SMAP, SMAPD)

_SUFFIX_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SUFFIX_BYTES = {"k": 1024, "m": 1024**2, "g": 1024**3}
_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-[]:_")


class Key:
    """One keyword: who reads it, how its argument is parsed, default and bounds."""

    __slots__ = ("attr", "default", "doc", "hi", "kind", "lo", "multi", "name", "programs")

    def __init__(
        self,
        name: str,
        programs: tuple[str, ...],
        kind: str,
        default: object,
        doc: str,
        lo: int | None = None,
        hi: int | None = None,
        multi: bool = False,
    ) -> None:
        self.name = name
        self.attr = name
        self.programs = programs
        self.kind = kind
        self.default = default
        self.doc = doc
        self.lo = lo
        self.hi = hi
        # Every line counts, in table order (domain lists, access rules), instead of
        # FWTK's first-line-wins; the value is the lines' arguments, checked by
        # smapq.config.policy.
        self.multi = multi

    def parse(self, rule: Rule) -> object:
        """The typed value of ``rule``'s argument, or a ``ConfigError`` naming the line."""
        if len(rule.args) != 1:
            raise rule.error(f"takes exactly one argument, got {len(rule.args)}")
        text = rule.args[0]
        parser = _PARSERS[self.kind]
        try:
            value = parser(text)
        except ValueError as exc:
            raise rule.error(str(exc)) from None
        if isinstance(value, int) and not isinstance(value, bool):
            if self.lo is not None and value < self.lo:
                raise rule.error(f"{text} is below the minimum {self.lo}")
            if self.hi is not None and value > self.hi:
                raise rule.error(f"{text} is above the maximum {self.hi}")
        return value


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _scaled(text: str, suffixes: dict[str, int], what: str) -> int:
    scale = suffixes.get(text[-1:].lower())
    digits = text[:-1] if scale else text
    if not digits.isdigit():
        units = "".join(suffixes)
        raise ValueError(f"{text!r} is not {what} (a number, optionally suffixed {units})")
    return int(digits) * (scale or 1)


def parse_seconds(text: str) -> int:
    """``90``, ``5m``, ``2h``, ``5d``, ``1w`` -> seconds."""
    return _scaled(text, _SUFFIX_SECONDS, "a duration")


def _bytes(text: str) -> int:
    return _scaled(text, _SUFFIX_BYTES, "a size")


def _bool(text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not on/off")


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} is not an absolute path")
    return os.path.normpath(text)


def _user(text: str) -> int:
    try:
        return pwd.getpwuid(int(text)).pw_uid if text.isdigit() else pwd.getpwnam(text).pw_uid
    except KeyError:
        if text.isdigit():
            # FWTK accepted a bare number with no passwd entry; so do we.
            return int(text)
        raise ValueError(f"unknown user {text!r}") from None


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {text!r}") from None


def _host(text: str) -> str:
    if not set(text) <= _HOST_CHARS or len(text) > 255:
        raise ValueError(f"{text!r} is not a host name")
    return text


def _database(text: str) -> str:
    if "://" not in text and ("\x00" in text or text.endswith("/")):
        raise ValueError(f"{text!r} is not a database file name or URL")
    return text


def _codes(text: str) -> frozenset[int]:
    codes = set()
    for part in text.split(","):
        if not part.isdigit() or not 0 < int(part) < 256:
            raise ValueError(f"{part!r} is not an exit code 1..255")
        codes.add(int(part))
    return frozenset(codes)


def _word(text: str) -> str:
    return text


_PARSERS: dict[str, Callable[[str], object]] = {
    "int": _int,
    "seconds": parse_seconds,
    "bytes": _bytes,
    "bool": _bool,
    "path": _path,
    "user": _user,
    "group": _group,
    "host": _host,
    "database": _database,
    "codes": _codes,
    "word": _word,
}

BOTH = (SMAP, SMAPD)

# The table. Defaults of None mean "unset" (see settings.py for what follows from that).
KEYS: tuple[Key, ...] = (
    # --- FWTK keywords -------------------------------------------------------------
    Key("userid", BOTH, "user", None, "user (name or number) to run as; smap refuses 0"),
    Key("groupid", BOTH, "group", None, "group to run as; default: the user's group"),
    Key("directory", BOTH, "path", "/var/spool/smap", "the spool: smap's chroot, holds the DB"),
    Key(
        "timeout",
        (SMAP,),
        "seconds",
        300,
        "idle seconds before 421 (RFC 5321 4.5.3.2.7)",
        lo=0,
        hi=86400,
    ),
    Key(
        "maxbytes", (SMAP,), "bytes", 10240000, "largest message body, octets", lo=1024, hi=1024**3
    ),
    Key(
        "maxrecip",
        (SMAP,),
        "int",
        1000,
        "recipients per message (RFC 5321 4.5.3.1.8)",
        lo=1,
        hi=100000,
    ),
    Key(
        "strictpipelining",
        (SMAP,),
        "bool",
        True,
        "554 and close when a client sends ahead where PIPELINING does not allow it",
    ),
    # --- smapq serve: limits at the door (Postfix's anvil defaults) -------------------
    Key(
        "maxsessions",
        (SMAP,),
        "int",
        500,
        "serve: sessions at once, all clients (then 421 4.7.0); 0 = no limit",
        lo=0,
        hi=1_000_000,
    ),
    Key(
        "maxperclient",
        (SMAP,),
        "int",
        50,
        "serve: sessions at once per client address or IPv6 /64; 0 = no limit",
        lo=0,
        hi=1_000_000,
    ),
    Key(
        "clientrate",
        (SMAP,),
        "int",
        0,
        "serve: new connections per minute per client; 0 = no limit (Postfix: off)",
        lo=0,
        hi=1_000_000,
    ),
    Key(
        "exemptloopback",
        (SMAP,),
        "bool",
        True,
        "serve: loopback clients skip maxperclient and clientrate (Postfix: mynetworks)",
    ),
    Key(
        "sessiontime",
        (SMAP,),
        "seconds",
        3600,
        "longest SMTP session, then 421 4.4.2",
        lo=1,
        hi=7 * 86400,
    ),
    Key("sendmail", (SMAPD,), "path", "/usr/lib/sendmail", "program that delivers a message"),
    Key("baddir", (SMAPD,), "path", None, "export failed messages here as .eml files"),
    Key("wakeup", (SMAPD,), "seconds", 30, "seconds between full queue scans", lo=1, hi=86400),
    Key("maxchildren", (SMAPD,), "int", 6, "concurrent sendmail processes", lo=1, hi=256),
    Key("executable", (SMAPD,), "word", None, "accepted and ignored, as FWTK smapd did"),
    # --- smapq keywords --------------------------------------------------------------
    Key(
        "database",
        BOTH,
        "database",
        "smapq.db",
        "queue DB file inside the jail, or a SQLAlchemy URL",
    ),
    Key(
        "hostname",
        BOTH,
        "host",
        None,
        "name in the banner, Received: and smapd's DSNs; default: smap's, else uname",
    ),
    Key(
        "logfile",
        (SMAP,),
        "path",
        None,
        "also write log lines to this file (hosts without syslog)",
    ),
    Key(
        "tlscert",
        (SMAP,),
        "path",
        None,
        "PEM certificate (chain) for STARTTLS, read as root before the jail; needs tlskey",
    ),
    Key(
        "tlskey",
        (SMAP,),
        "path",
        None,
        "PEM private key for STARTTLS, read as root before the jail; mode 0600 or 0400",
    ),
    # --- the access policy (smapq.config.policy, docs/policy.md) ----------------------
    Key(
        "domains",
        (SMAP,),
        "domains",
        None,
        "accept RCPT only for these domains (.example.com: its subdomains) or the "
        "domains listed in these files; others get 550 5.7.1; every line adds",
        multi=True,
    ),
    Key(
        "recipients",
        (SMAP,),
        "path",
        None,
        "file of valid recipients of the domains (local parts or addresses); others get 550 5.1.1",
    ),
    Key(
        "rule",
        (SMAP,),
        "rule",
        None,
        "allow|deny|noto CLIENT SENDER RECIPIENT: Obtuse check_rules, first match wins, "
        "checked at RCPT; every line adds, in table order",
        multi=True,
    ),
    Key("jail", (SMAP,), "bool", True, "chroot into directory; 'off' only where root is absent"),
    Key("maxerrors", (SMAP,), "int", 10, "bad commands before 421 and close", lo=1, hi=1000),
    Key(
        "minfree",
        (SMAP,),
        "bytes",
        0,
        "free spool space below which MAIL gets 452 4.3.1; at least 1.5 x maxbytes",
        lo=0,
        hi=1024**4,
    ),
    Key("lease", (SMAPD,), "seconds", 60, "claim lease; renewed twice per lease", lo=5, hi=3600),
    Key(
        "minbackoff", (SMAPD,), "seconds", 300, "first retry delay (Postfix: 300s)", lo=1, hi=86400
    ),
    Key(
        "maxbackoff",
        (SMAPD,),
        "seconds",
        3600,
        "longest retry delay (Postfix: 4000s)",
        lo=1,
        hi=7 * 86400,
    ),
    Key(
        "maxqueuetime",
        (SMAPD,),
        "seconds",
        5 * 86400,
        "give up and mark bad after (RFC 5321 4.5.4.1)",
        lo=60,
        hi=60 * 86400,
    ),
    Key(
        "sendmailtimeout",
        (SMAPD,),
        "seconds",
        1000,
        "kill sendmail after (Postfix: 1000s)",
        lo=1,
        hi=86400,
    ),
    Key("maxrcptbatch", (SMAPD,), "int", 100, "recipients per sendmail run", lo=1, hi=1000),
    Key(
        "retrycodes",
        (SMAPD,),
        "codes",
        frozenset({71, 74, 75}),
        "sendmail exit codes that mean retry later (others: bad)",
    ),
    Key(
        "outputmax", (SMAPD,), "bytes", 4096, "sendmail output kept per attempt", lo=0, hi=1024**2
    ),
    Key(
        "bounce",
        (SMAPD,),
        "bool",
        False,
        "send the sender an RFC 3464 DSN when mail goes bad (FWTK: never)",
    ),
    Key(
        "delaywarning",
        (SMAPD,),
        "seconds",
        0,
        "with bounce on: warn the sender once after this delay (0: never, as Postfix)",
        lo=0,
        hi=60 * 86400,
    ),
    Key(
        "keepbodies",
        (SMAPD,),
        "seconds",
        7 * 86400,
        "drop the body of delivered mail after this (0: keep forever)",
        lo=0,
        hi=3650 * 86400,
    ),
    Key(
        "keepevents",
        (SMAPD,),
        "seconds",
        90 * 86400,
        "delete envelope-log events after this, but not a waiting message's (0: never)",
        lo=0,
        hi=3650 * 86400,
    ),
)

BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def keys_for(program: str) -> list[Key]:
    return [k for k in KEYS if program in k.programs]
