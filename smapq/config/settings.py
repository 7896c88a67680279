"""Resolved settings for smap and smapd, built from the netperm-table and the key table.

Purpose: ``load(path)`` reads the table once and returns ``Config`` with ``.smap`` and
``.smapd``, every keyword of the key table set (from its first rule or its default),
and where each value came from (for ``smapq check-config``).

Security: smap refuses uid/gid 0; the table's mode and owner are checked by netperm.py.
Lines for other FWTK programs are ignored; a line naming smap or smapd with a keyword
neither knows is an error, so a typo never silently falls back to a default.

Lean: imported by the inetd receiver; stdlib only.
"""

from __future__ import annotations

import os
import pwd

from smapq.config import keys as K
from smapq.config.netperm import Rule, first_rule, parse_lines, read_rules, rules_for
from smapq.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from smapq.config.policy import Policy


def url_has_password(database: str) -> bool:
    """Whether a database URL spells out a password (user:secret@ or password=)."""
    if "://" not in database:
        return False
    rest = database.split("://", 1)[1]
    netloc, _, query = rest.partition("?")
    userinfo = netloc.split("/", 1)[0].rpartition("@")[0]
    return ":" in userinfo or "password=" in query.lower()


class Settings:
    """Every keyword of one program; attribute names are the keywords."""

    program = ""
    # Typed attributes shared by smap and smapd.
    userid: int | None
    groupid: int | None
    directory: str
    database: str

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.origin: dict[str, str] = {}
        rules = list(rules)
        chosen = first_rule(rules)
        for key in K.keys_for(self.program):
            rule = chosen.get(key.name)
            if key.multi:
                lines = [r for r in rules if r.keyword == key.name]
                value = tuple(" ".join(r.args) for r in lines) or key.default
                where = ", ".join(f"{r.path}:{r.line}" for r in lines)
                self.origin[key.name] = where or "default"
            elif rule is None:
                value = key.default
                self.origin[key.name] = "default"
            else:
                value = key.parse(rule)
                self.origin[key.name] = f"{rule.path}:{rule.line}"
            setattr(self, key.attr, value)
        if self.groupid is None and self.userid is not None:
            self.groupid = _primary_gid(self.userid)

    @property
    def database_is_url(self) -> bool:
        return "://" in self.database

    @property
    def database_path(self) -> str:
        """The DB file as seen from outside the jail (admin tools, smapd)."""
        return os.path.join(self.directory, self.database.lstrip("/"))

    def items(self) -> list[tuple[str, object, str]]:
        """(keyword, value, origin) for every keyword, in key-table order."""
        return [
            (k.name, getattr(self, k.attr), self.origin[k.name]) for k in K.keys_for(self.program)
        ]


class SmapSettings(Settings):
    """The receiver's settings."""

    program = K.SMAP
    timeout: int
    maxbytes: int
    maxrecip: int
    hostname: str | None
    logfile: str | None
    tlscert: str | None
    tlskey: str | None
    jail: bool
    maxerrors: int
    minfree: int
    strictpipelining: bool
    maxsessions: int
    maxperclient: int
    clientrate: int
    exemptloopback: bool
    sessiontime: int
    domains: tuple[str, ...] | None
    recipients: str | None
    rule: tuple[str, ...] | None

    def __init__(self, rules: Iterable[Rule]) -> None:
        rules = list(rules)
        super().__init__(rules)
        self.policy: Policy | None = None
        if self.domains or self.recipients or self.rule:
            # Only then: a table without policy keywords pays nothing for them.
            from smapq.config.policy import build  # noqa: PLC0415

            self.policy = build(rules)
        for name in ("userid", "groupid"):
            if getattr(self, name) == 0:
                raise ConfigError(
                    "smap must not run as root (uid/gid 0)", self.origin[name], 0, name
                )
        if bool(self.tlscert) != bool(self.tlskey):
            have, need = ("tlscert", "tlskey") if self.tlscert else ("tlskey", "tlscert")
            path, _, line = self.origin[have].rpartition(":")
            raise ConfigError(f"STARTTLS needs {need} too", path, int(line), have)

    @property
    def reserve(self) -> int:
        """Free spool bytes below which intake refuses new mail (452 4.3.1).

        Postfix's rule: at least 1.5 x the size limit, so a message of the largest size
        still fits and the deliverer keeps room to record outcomes (a full SQLite file
        refuses even the UPDATE that would free space).
        """
        return max(self.minfree, self.maxbytes * 3 // 2)

    @property
    def database_in_jail(self) -> str:
        """The DB file as the receiver opens it: inside the chroot when jailed."""
        if self.jail:
            return "/" + self.database.lstrip("/")
        return self.database_path


class SmapdSettings(Settings):
    """The deliverer's settings."""

    program = K.SMAPD
    sendmail: str
    baddir: str | None
    wakeup: int
    maxchildren: int
    executable: str | None
    lease: int
    minbackoff: int
    maxbackoff: int
    maxqueuetime: int
    sendmailtimeout: int
    maxrcptbatch: int
    retrycodes: frozenset[int]
    outputmax: int
    keepbodies: int
    keepevents: int
    hostname: str | None
    bounce: bool
    delaywarning: int

    @property
    def host(self) -> str:
        """The name smapd's delivery status notifications give (Reporting-MTA, From:)."""
        return self.hostname or os.uname().nodename


class Config:
    """The table as both programs see it."""

    __slots__ = ("path", "smap", "smapd")

    def __init__(self, path: str, smap: SmapSettings, smapd: SmapdSettings) -> None:
        self.path = path
        self.smap = smap
        self.smapd = smapd

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not what the operator meant."""
        out = []
        if self.smap.database_path != self.smapd.database_path:
            out.append(
                f"smap queues into {self.smap.database_path} but smapd reads "
                f"{self.smapd.database_path}"
            )
        boundary = self.boundary()
        if boundary:
            out.append(boundary)
        if not self.smap.jail:
            out.append("smap: jail off -- the receiver will not chroot")
        if self.smap.policy is None:
            out.append(
                "smap: no domains, recipients or rule: smap accepts mail for any domain from "
                "any client -- the front door of an open relay if sendmail forwards it "
                "(docs/policy.md)"
            )
        same = self.smap.database == self.smapd.database
        for who, database in (
            [("smap, smapd", self.smap.database)]
            if same
            else [("smap", self.smap.database), ("smapd", self.smapd.database)]
        ):
            if url_has_password(database):
                out.append(
                    f"{who}: database URL carries a password: keep it in a passfile or "
                    "service file instead (docs/postgresql.md)"
                )
        d = self.smapd
        if d.delaywarning and not d.bounce:
            out.append("smapd: delaywarning is set but bounce is off: no warning is sent")
        elif d.bounce and d.delaywarning >= d.maxqueuetime:
            out.append(
                "smapd: delaywarning is not below maxqueuetime: mail goes bad before any "
                "warning is due"
            )
        return out

    def boundary(self) -> str:
        """What the table's choice of uids means for the smap/smapd boundary ('' if fine).

        See docs/SECURITY.md: a uid of its own for smapd lets the kernel keep every
        process of smap's uid away from smapd and its sendmails; a shared uid leaves
        that to smap's seccomp filter, which only binds processes smap started.
        """
        suid, duid = self.smap.userid, self.smapd.userid
        if duid is None:
            return (
                "smapd: userid is unset: smapd runs as whoever starts it (root, from init) "
                "and so does every sendmail it runs"
            )
        if suid == duid:
            return (
                f"smap and smapd share uid {suid}: smap's seccomp filter keeps smap and "
                "what it starts away from smapd and its sendmails, but other processes of "
                f"uid {suid} can ptrace and signal them; give smapd a userid of its own "
                "and a groupid shared with smap (docs/SECURITY.md)"
            )
        return ""


def _primary_gid(uid: int) -> int | None:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return None


def check_keywords(rules: Iterable[Rule]) -> None:
    """Refuse keywords neither smap nor smapd knows on lines that name them explicitly.

    ``*`` lines are shared with every FWTK program, so their foreign keywords
    (authserver, ...) are someone else's business and pass unchecked.
    """
    for rule in rules:
        named = [p for p in rule.programs if p in K.PROGRAMS]
        if not named:
            continue
        key = K.BY_NAME.get(rule.keyword)
        if key is None:
            raise rule.error(f"unknown keyword for {', '.join(named)}")
        if not set(named) & set(key.programs):
            raise rule.error(f"not a keyword of {', '.join(named)}")


def _settings_rules(rules: list[Rule], program: str) -> list[Rule]:
    # A '*' rule with a keyword this program does not know belongs to another program.
    known = {k.name for k in K.keys_for(program)}
    return [r for r in rules_for(rules, program) if r.keyword in known]


def from_rules(path: str, rules: list[Rule]) -> Config:
    check_keywords(rules)
    smap = SmapSettings(_settings_rules(rules, K.SMAP))
    smapd = SmapdSettings(_settings_rules(rules, K.SMAPD))
    if smapd.hostname is None and smap.hostname is not None:
        # One name for the host: a table written before smapd read hostname (or that
        # names it once, for smap) gives smapd's notices the banner's name.
        smapd.hostname = smap.hostname
        smapd.origin["hostname"] = f"{smap.origin['hostname']} (smap's)"
    return Config(path, smap, smapd)


def load(path: str) -> Config:
    """Read and check the table at ``path``; raises ``ConfigError`` naming file:line."""
    return from_rules(path, read_rules(path))


def loads(text: str, path: str = "<string>") -> Config:
    """Like ``load`` for table text (tests, ``check-config -``); no mode check."""
    return from_rules(path, list(parse_lines(text.splitlines(), path)))
