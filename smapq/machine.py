"""``smapq check-config`` on the real machine: does it match what the table says?

Purpose: the table can be perfect while the machine is not -- a database left 0400, a
-wal file owned by root after an admin command, a baddir smapd cannot write, a
sendmail that is gone, a schema one migration behind, a spool below the intake's
reserve. Each of those made mail wait (every message answered 451) while every check
said all was well. ``problems()`` looks at the files as smap's and smapd's uids will
meet them and returns one line per problem.

What is checked: the spool directory (smap's jail) and the database with its -wal and
-shm files -- type, owner and mode as ``smapq init`` makes them (spool.Layout), read
and write access for smap's and smapd's uid and group, and for smapd (and for smap
when it does not chroot) every directory on the way; baddir (smapd writes it);
sendmail (smapd executes it); the schema revision; free space against
``SmapSettings.reserve``; a note that the database was found damaged; whether smap can
confine itself here (smapq.sandbox) and has a userid to drop to; the STARTTLS
certificate and key (``smap: tlscert``/``tlskey``): readable by root, the key
readable by no group, nobody else and not by smap's uid (smap reads it as root before
the jail and must never be able to read it from inside), and the pair loads and
matches.

Security: read-only; runs as root or as the spool's owner. Access is computed from
owner, group and mode bits for the uid and the one group each program keeps after
its privilege drop (both call setgroups([])), not with access(2), which would answer
for the caller.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from smapq import sandbox, spool
from smapq.config.settings import Config
from smapq.config.tls import server_context
from smapq.errors import ConfigError, SmapqError
from smapq.store import damage

R, W, X = 4, 2, 1


class Who:
    """A program's uid and group as it runs (after its drop)."""

    __slots__ = ("gid", "name", "uid")

    def __init__(self, name: str, uid: int | None, gid: int | None) -> None:
        self.name = name
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid

    def may(self, st: os.stat_result, want: int) -> bool:
        if self.uid == 0:
            return not (want & X) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == self.gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & want == want

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid} gid {self.gid})"


def _words(want: int) -> str:
    return "/".join(w for bit, w in ((R, "read"), (W, "write"), (X, "search")) if want & bit)


class Inspector:
    """Collects problems; one method per thing to look at."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.smap = Who("smap", config.smap.userid, config.smap.groupid)
        self.smapd = Who("smapd", config.smapd.userid, config.smapd.groupid)
        self.problems: list[str] = []

    def say(self, text: str) -> None:
        self.problems.append(text)

    def stat(self, path: str, what: str) -> os.stat_result | None:
        try:
            return os.lstat(path)
        except FileNotFoundError:
            self.say(f"{path}: {what} does not exist (smapq init makes it)")
        except OSError as exc:
            self.say(f"{path}: cannot look at the {what}: {exc.strerror}")
        return None

    def owned(self, path: str, st: os.stat_result, uid: int, gid: int, mode: int) -> None:
        if (st.st_uid, st.st_gid) != (uid, gid):
            self.say(
                f"{path}: owned by {st.st_uid}:{st.st_gid}, should be {uid}:{gid} "
                "(smapq init repairs it)"
            )
        if stat.S_IMODE(st.st_mode) != mode:
            self.say(
                f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, should be {mode:04o} "
                "(smapq init repairs it)"
            )

    def access(self, path: str, st: os.stat_result, who: Who, want: int) -> None:
        if not who.may(st, want):
            self.say(f"{path}: {who} cannot {_words(want)} it")

    def way_to(self, path: str, who: Who) -> None:
        """Every directory above ``path`` must be searchable by ``who``."""
        parent = os.path.dirname(os.path.abspath(path))
        while True:
            try:
                st = os.stat(parent)
            except OSError:
                return  # reported for the path itself
            if not who.may(st, X):
                self.say(f"{parent}: {who} cannot search it, so cannot reach {path}")
            up = os.path.dirname(parent)
            if up == parent:
                return
            parent = up

    # --- the things to look at ---------------------------------------------------------

    def queue(self) -> None:
        smap = self.config.smap
        try:
            lay = spool.layout(self.config)
        except SmapqError as exc:
            self.say(str(exc))
            return
        st = self.stat(smap.directory, "spool directory")
        if st is not None:
            if not stat.S_ISDIR(st.st_mode):
                self.say(f"{smap.directory}: the spool is not a directory")
                return
            self.owned(smap.directory, st, lay.suid, lay.gid, lay.dir_mode)
            for who in (self.smap, self.smapd):
                self.access(smap.directory, st, who, R | W | X)
            self.way_to(smap.directory, self.smapd)
            if not smap.jail:
                self.way_to(smap.directory, self.smap)
        if smap.database_is_url:
            return
        db = smap.database_path
        st = self.stat(db, "queue database")
        if st is None:
            return
        if not stat.S_ISREG(st.st_mode):
            self.say(f"{db}: the queue database is not a regular file")
            return
        self.owned(db, st, lay.suid, lay.gid, lay.db_mode)
        for suffix in ("", "-wal", "-shm"):
            path = db + suffix
            try:
                file_st = os.lstat(path)
            except FileNotFoundError:
                continue
            if suffix and (file_st.st_uid, file_st.st_gid) != (st.st_uid, st.st_gid):
                self.say(
                    f"{path}: owned by {file_st.st_uid}:{file_st.st_gid}, not by the "
                    f"database's owner {st.st_uid}:{st.st_gid} (smapq init repairs it)"
                )
            for who in (self.smap, self.smapd):
                self.access(path, file_st, who, R | W)
        note = damage.note(db)
        if note is not None:
            self.say(f"{db}: found damaged ({note}): run 'smapq db verify'")

    def baddir(self) -> None:
        directory = self.config.smapd.baddir
        if not directory:
            return
        st = self.stat(directory, "baddir")
        if st is None:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.say(f"{directory}: baddir is not a directory")
            return
        self.access(directory, st, self.smapd, W | X)
        self.way_to(directory, self.smapd)

    def sendmail(self) -> None:
        program = self.config.smapd.sendmail
        try:
            st = os.stat(program)
        except FileNotFoundError:
            self.say(f"{program}: sendmail does not exist (smapd: sendmail)")
            return
        except OSError as exc:
            self.say(f"{program}: cannot look at sendmail: {exc.strerror}")
            return
        if not stat.S_ISREG(st.st_mode):
            self.say(f"{program}: sendmail is not a regular file")
            return
        self.access(program, st, self.smapd, X)
        self.way_to(program, self.smapd)

    def space(self) -> None:
        smap = self.config.smap
        try:
            vfs = os.statvfs(smap.directory)
        except OSError:
            return  # the spool itself was reported
        free = vfs.f_bavail * vfs.f_frsize
        if free < smap.reserve:
            self.say(
                f"{smap.directory}: {free} bytes free, below the reserve of {smap.reserve} "
                "(smap: minfree, at least 1.5 x maxbytes): intake answers 452 4.3.1"
            )

    def tls(self) -> None:
        smap = self.config.smap
        if not smap.tlscert or not smap.tlskey:
            return
        where = {k: f"{smap.origin[k]}: {k}" for k in ("tlscert", "tlskey")}
        for keyword, path in (("tlscert", smap.tlscert), ("tlskey", smap.tlskey)):
            try:
                st = os.stat(path)
                with open(path, "rb"):
                    pass
            except OSError as exc:
                self.say(f"{where[keyword]}: cannot read {path}: {exc.strerror}")
                return
            if keyword == "tlskey":
                if stat.S_IMODE(st.st_mode) & 0o077:
                    self.say(
                        f"{where[keyword]}: {path}: mode {stat.S_IMODE(st.st_mode):04o}, the "
                        "key must be readable by its owner only (0600 or 0400)"
                    )
                elif self.smap.uid is not None and self.smap.may(st, R):
                    self.say(
                        f"{where[keyword]}: {path}: {self.smap} can read the key; it "
                        "must be readable by root only (smap loads it before the jail)"
                    )
        try:
            server_context(smap)
        except ConfigError as exc:
            self.say(str(exc))

    def receiver(self) -> None:
        smap = self.config.smap
        if os.geteuid() == 0 and smap.userid is None:
            self.say("smap: userid is not set: smap refuses to serve mail when started as root")
        reason = _confinable()
        if reason:
            self.say(f"smap cannot keep away from smapd's processes on this machine: {reason}")


def _confinable() -> str:
    """'' if a process can be confined here (tried in a child), else why not."""
    if sandbox.machine() is None:
        return f"no seccomp filter for {os.uname().machine}"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            sandbox.confine()
            os.write(write, b"")
        except BaseException as exc:  # any failure is the answer, never a traceback
            os.write(write, str(exc).encode("utf-8", "replace")[:500])
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        text = fh.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    return text


def problems(config: Config, schema: Callable[[], str | None] | None = None) -> list[str]:
    """One line per problem the machine has with ``config`` (empty: none).

    ``schema()`` returns a problem with the database schema, or None; it is only
    called when the database file looked usable.
    """
    look = Inspector(config)
    look.queue()
    look.baddir()
    look.sendmail()
    look.space()
    look.receiver()
    look.tls()
    if schema is not None and (config.smap.database_is_url or os.path.exists(
        config.smap.database_path
    )):  # fmt: skip
        try:
            found = schema()
        except SmapqError as exc:
            found = str(exc)
        if found:
            look.say(found)
    return look.problems
