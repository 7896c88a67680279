"""Read the FWTK netperm-table: ``prog[,prog...]: keyword args...``.

Purpose: turn the table into rules for one program, in file order, exactly as FWTK's
``cfg_read(prog)`` did: a rule applies when its program list names the program or
``*``; lines for other programs (ftp-gw, http-gw, ...) are skipped unchecked; the first
rule for a keyword wins (``first_rule``).

Security: the table decides which uid the receiver drops to and which program the
deliverer executes, so a table that group or others may write is refused, as is one
owned by somebody other than root or the invoking user (the FWTK advice: root, 0600).
Nobody else may be able to replace it either: every directory on its path, symlinks
followed as the kernel does, must belong to root or the invoking user and must not be
writable by others -- except a sticky one (/tmp), where only the entry's owner can
rename or remove it, so the next entry must then belong to root or the invoking user
(a symlink planted there by someone else is refused). Group-writable directories pass
(Debian's /usr/local/etc is root:staff 2775; staff is trusted with root's PATH).
With the path safe, nothing can change between the check and the open.

Standards: FWTK netperm-table syntax. Only whole-line ``#`` comments, as in FWTK.

Diagnostics: every problem is a ``ConfigError`` naming ``file:line`` and the keyword.

Lean: runs in the inetd receiver before every SMTP session; stdlib only, no ``re``.
"""

from __future__ import annotations

import os
import stat

from smapq.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

DEFAULT_TABLE = "/usr/local/etc/netperm-table"
TABLE_ENV = "SMAPQ_TABLE"


class Rule:
    """One table line that applies to the program being configured."""

    __slots__ = ("args", "keyword", "line", "path", "programs")

    def __init__(
        self, path: str, line: int, programs: tuple[str, ...], keyword: str, args: list[str]
    ) -> None:
        self.path = path
        self.line = line
        self.programs = programs
        self.keyword = keyword
        self.args = args

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.path, self.line, self.keyword)

    def __repr__(self) -> str:
        return f"Rule({self.path}:{self.line} {','.join(self.programs)}: {self.keyword})"


def table_path(explicit: str | None = None) -> str:
    """The table to read: ``-t PATH``, else ``$SMAPQ_TABLE``, else the FWTK default."""
    if explicit:
        return explicit
    return os.environ.get(TABLE_ENV) or DEFAULT_TABLE


def parse_lines(lines: Iterable[str], path: str) -> Iterator[Rule]:
    """Every rule in the table, for any program; malformed lines raise ``ConfigError``."""
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        head, colon, rest = text.partition(":")
        if not colon:
            raise ConfigError("missing ':' after the program names", path, number)
        programs = tuple(p.strip() for p in head.split(","))
        if not all(programs) or any(_bad_name(p) for p in programs):
            raise ConfigError(f"bad program list {head.strip()!r}", path, number)
        words = rest.split()
        if not words:
            raise ConfigError("missing keyword after ':'", path, number)
        yield Rule(path, number, programs, words[0], words[1:])


def _bad_name(name: str) -> bool:
    return any(c.isspace() for c in name)


def check_mode(path: str, st: os.stat_result) -> None:
    """Refuse a table that someone other than its owner could have written."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("not a regular file", path)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); use chmod 600",
            path,
        )
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"owned by uid {st.st_uid}, not root or the invoking user", path)


MAX_SYMLINKS = 40  # as the kernel's limit for one path resolution


def check_path(path: str) -> None:
    """Refuse a table that anyone but root or the invoking user could replace.

    Walks ``path`` one component at a time from ``/``, following symlinks itself, and
    checks each directory and the entry it leads to (see the module docstring). A
    missing component is left for the open to report.
    """
    trusted = (0, os.geteuid())
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    pending = path.split("/")
    pending.reverse()
    current = "/"
    links = 0
    try:
        parent = os.lstat("/")
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                current = os.path.dirname(current)
                parent = os.lstat(current)
                continue
            entry = os.path.join(current, name)
            st = os.lstat(entry)
            _check_entry(path, current, parent, entry, st, trusted)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise ConfigError("too many symbolic links on the path", path)
                target = os.readlink(entry)
                if target.startswith("/"):
                    current = "/"
                    parent = os.lstat("/")
                pending.extend(reversed(target.split("/")))
                continue
            current, parent = entry, st
    except FileNotFoundError:
        return
    except PermissionError:
        raise ConfigError("permission denied", path) from None
    except OSError as exc:
        raise ConfigError(f"{exc.strerror}", path) from None


def _check_entry(
    path: str,
    directory: str,
    dir_st: os.stat_result,
    entry: str,
    st: os.stat_result,
    trusted: tuple[int, int],
) -> None:
    """``entry`` in ``directory``: may anyone untrusted replace it?"""
    if dir_st.st_uid not in trusted:
        raise ConfigError(
            f"{directory}: directory on the table's path belongs to uid {dir_st.st_uid}, "
            "not root or the invoking user",
            path,
        )
    if dir_st.st_mode & stat.S_IWOTH:
        if not dir_st.st_mode & stat.S_ISVTX:
            raise ConfigError(
                f"{directory}: directory on the table's path is writable by others", path
            )
        if st.st_uid not in trusted:
            raise ConfigError(
                f"{entry}: in the world-writable directory {directory} and belongs to uid "
                f"{st.st_uid}, who could replace it",
                path,
            )


def read_rules(path: str) -> list[Rule]:
    """Every rule of the table at ``path``, in file order, after the path and mode checks."""
    check_path(path)
    try:
        with open(path, encoding="utf-8", errors="strict") as fh:
            check_mode(path, os.fstat(fh.fileno()))
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except PermissionError:
        raise ConfigError("permission denied", path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason})", path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory", path) from None
    return list(parse_lines(text.splitlines(), path))


def rules_for(rules: Iterable[Rule], program: str) -> list[Rule]:
    """The rules that name ``program`` or ``*``."""
    return [r for r in rules if program in r.programs or "*" in r.programs]


def first_rule(rules: Iterable[Rule]) -> dict[str, Rule]:
    """Keyword -> the first rule that sets it (FWTK: the first match wins)."""
    chosen: dict[str, Rule] = {}
    for rule in rules:
        chosen.setdefault(rule.keyword, rule)
    return chosen
