"""Manual pages smapq(8), smap(8), smapd(8) and netperm-table(5), generated.

Purpose: the pages are rendered from what the programs really accept -- the click
command tree (every command, its usage, help and options) and the key table
(``smapq.config.keys.KEYS``: every keyword, its programs, type, default and bounds) --
so a new command or keyword is documented by being added. The prose around them
(what the programs are, exit statuses, files) is written here.

Build: ``setup.py`` calls ``write_pages`` while building the wheel, and the pages are
installed as data files under ``share/man/man5`` and ``share/man/man8`` of the
installation prefix (man-db finds ``/opt/smapq/share/man`` from ``/opt/smapq/bin`` on
PATH). ``python -m smapq_cli.manpage DIR`` writes them by hand.

Standards: man(7) macros; text is escaped for roff (backslashes, leading dots and
quotes, and ``-`` as ``\\-`` in options so they can be searched and copied).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterable, Sequence

import click

from smapq import __version__
from smapq.config.keys import KEYS, SMAP, SMAPD, Key

INETD_LINE = (
    "smtp stream tcp nowait.6000 root /opt/smapq/bin/smap smap -t /usr/local/etc/netperm-table"
)
SEE_ALSO = {
    "smapq": ["smap(8)", "smapd(8)", "netperm-table(5)", "postqueue(1)", "postsuper(1)"],
    "smap": ["smapq(8)", "smapd(8)", "netperm-table(5)", "inetd(8)", "systemd.socket(5)"],
    "smapd": ["smapq(8)", "smap(8)", "netperm-table(5)", "sendmail(8)"],
    "netperm-table": ["smap(8)", "smapd(8)", "smapq(8)"],
}


def esc(text: str) -> str:
    """``text`` as roff input: backslashes escaped, non-ASCII as ``\\[uXXXX]``, no line
    taken for a request."""
    text = text.replace("\\", "\\e")
    text = "".join(ch if ord(ch) < 128 else f"\\[u{ord(ch):04X}]" for ch in text)
    out = []
    for line in text.split("\n"):
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return "\n".join(out)


def opt(text: str) -> str:
    """An option or command line: hyphens as \\- (searchable, copyable minus signs)."""
    return esc(text).replace("-", "\\-")


def _head(name: str, section: int, summary: str) -> list[str]:
    date = dt.datetime.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or dt.datetime.now(dt.UTC).timestamp(),
        dt.UTC,
    ).strftime("%Y-%m-%d")
    return [
        f'.TH "{name.upper()}" "{section}" "{date}" "smapq {__version__}" "smapq"',
        ".SH NAME",
        f"{opt(name)} \\- {esc(summary)}",
    ]


def _see_also(name: str) -> list[str]:
    refs = SEE_ALSO[name]
    lines = [".SH SEE ALSO"]
    for i, ref in enumerate(refs):
        name, section = ref.split("(")
        lines.append(f".BR {name} ({section}" + ("," if i < len(refs) - 1 else ""))
    return lines


# --- commands -----------------------------------------------------------------------


def command_paths(group: click.Group, prefix: Sequence[str] = ()) -> list[tuple[str, ...]]:
    """Every command below ``group`` (groups included), depth first, in name order."""
    out: list[tuple[str, ...]] = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        out.append(path)
        if isinstance(cmd, click.Group):
            out += command_paths(cmd, path)
    return out


def _resolve(root: click.Command, path: Sequence[str]) -> click.Command:
    cmd = root
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def _usage(prog: str, cmd: click.Command, path: Sequence[str]) -> str:
    ctx = click.Context(cmd, info_name=" ".join([prog, *path]))
    return " ".join(cmd.collect_usage_pieces(ctx))


def _options(cmd: click.Command) -> list[str]:
    lines: list[str] = []
    ctx = click.Context(cmd)
    for param in cmd.get_params(ctx):
        if not isinstance(param, click.Option):
            continue  # arguments are in the usage line
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, help_text = record
        lines += [".TP", f".B {opt(names)}", esc(help_text) if help_text else ""]
    return lines


def _help_paragraphs(text: str) -> list[str]:
    lines: list[str] = []
    for para in (text or "").strip().split("\n\n"):
        lines += [".PP", esc(" ".join(line.strip() for line in para.splitlines()))]
    return lines


def _command_section(prog: str, root: click.Command, path: Sequence[str]) -> list[str]:
    cmd = _resolve(root, path)
    lines = [f'.SS "{opt(" ".join([prog, *path]))}"']
    lines += [".PP", f".B {opt(' '.join([prog, *path]))}", opt(_usage(prog, cmd, path))]
    lines += _help_paragraphs(cmd.help or "")
    lines += _options(cmd)
    return lines


# --- keywords -----------------------------------------------------------------------

_KINDS = {
    "int": "a number",
    "seconds": "a duration in seconds, or with a suffix s, m, h, d, w",
    "bytes": "a size in bytes, or with a suffix k, m, g",
    "bool": "on or off",
    "path": "an absolute path",
    "user": "a user name or number",
    "group": "a group name or number",
    "host": "a host name",
    "database": "a file name inside the spool, or a SQLAlchemy URL",
    "codes": "exit codes separated by commas",
    "word": "one word",
    "domains": "domain names (.domain: its subdomains) or absolute paths of files of them",
    "rule": "allow, deny or noto, then CLIENT SENDER RECIPIENT patterns",
}


def default_text(key: Key) -> str:
    value = key.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, frozenset):
        return ",".join(str(v) for v in sorted(value))
    return str(value)


def keyword_entries(keys: Iterable[Key], show_programs: bool) -> list[str]:
    lines: list[str] = []
    for key in keys:
        lines += [".TP", f'.BI {esc(key.name)} " {esc(key.kind)}"']
        facts = [f"{esc(key.doc)}."]
        if show_programs:
            facts.append(f"Read by {', '.join(key.programs)}.")
        facts.append(f"Argument: {esc(_KINDS.get(key.kind, key.kind))}.")
        facts.append(f"Default: {esc(default_text(key))}.")
        if key.lo is not None or key.hi is not None:
            facts.append(f"Range: {key.lo if key.lo is not None else ''}..{key.hi or ''}.")
        lines.append(" ".join(facts))
    return lines


# --- the pages ----------------------------------------------------------------------


def smapq_page(root: click.Group) -> str:
    lines = _head("smapq", 8, "the FWTK smap/smapd sendmail wrapper with a database spool")
    lines += [
        ".SH SYNOPSIS",
        f".B smapq\n{opt('[-t PATH] COMMAND [ARGS]... [-t PATH]')}",
        ".SH DESCRIPTION",
        "smapq keeps the mail that",
        ".BR smap (8)",
        "accepts in a database (SQLite by default) and",
        ".BR smapd (8)",
        "hands it to sendmail. This program sets the spool up, runs the receiver and the",
        "deliverer under their long names, and is the administrator's tool: reports of",
        "the envelope log, queue surgery in the manner of postqueue and postsuper, and the",
        "import of an old FWTK smap spool.",
        ".PP",
        f"Every command takes {opt('-t PATH')} ({opt('--table')}) before or after its name;",
        "the innermost one given wins. Errors are one line on standard error.",
        ".SH COMMANDS",
    ]
    for path in command_paths(root):
        lines += _command_section("smapq", root, path)
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        ".B SMAPQ_TABLE",
        f"The netperm-table when {opt('-t')} is not given.",
        ".SH FILES",
        ".TP",
        ".I /usr/local/etc/netperm-table",
        "The configuration (see",
        ".BR netperm-table (5)).",
        ".TP",
        ".I /var/spool/smap/smapq.db",
        "The queue database (smap: directory and database).",
        ".SH EXIT STATUS",
        "0 on success; 1 when a command left something undone (a message it could not",
        "change, a malformed spool file); 64 for a usage error; 75 when",
        f"{opt('deliver --once')} deferred something; 78 for a bad netperm-table; 70 for an",
        "internal error.",
        ".SH SHELL COMPLETION",
        "Completion comes from click. For bash, add to",
        ".IR ~/.bashrc :",
        ".PP",
        ".RS",
        ".nf",
        'eval "$(_SMAPQ_COMPLETE=bash_source smapq)"',
        ".fi",
        ".RE",
        ".PP",
        "For zsh use",
        ".B zsh_source",
        "in",
        ".IR ~/.zshrc ,",
        "for fish",
        ".B fish_source",
        "(written to",
        ".IR ~/.config/fish/completions/smapq.fish ).",
        "The same works for smapd with",
        ".BR _SMAPD_COMPLETE .",
    ]
    lines += _see_also("smapq")
    return "\n".join(lines) + "\n"


def smapd_page(cmd: click.Command) -> str:
    lines = _head("smapd", 8, "deliver the queued mail through sendmail (FWTK smapd)")
    lines += [".SH SYNOPSIS", f".B smapd\n{opt(_usage('smapd', cmd, ()))}"]
    lines += [".SH DESCRIPTION", *_help_paragraphs(cmd.help or "")[1:]]
    lines += [
        ".PP",
        "smapd claims due messages with a lease, runs",
        f".B {opt('sendmail -oi -f SENDER -- RECIPIENT...')}",
        "(an argument vector, never a shell), and records each outcome: delivered;",
        "deferred with exponential backoff (sendmail exit codes in",
        ".BR retrycodes );",
        "or bad, exported to",
        ".B baddir",
        "when that is set. Delivery is at-least-once. New mail is picked up at once;",
        ".B wakeup",
        "bounds the time between full scans. SIGHUP re-reads the table; SIGTERM stops",
        "claiming and lets running sendmails finish, a second SIGTERM kills them.",
        ".SH OPTIONS",
    ]
    lines += _options(cmd)
    lines += [".SH CONFIGURATION", "The smapd lines of", ".BR netperm-table (5):"]
    lines += keyword_entries([k for k in KEYS if SMAPD in k.programs], show_programs=False)
    lines += [
        ".SH EXIT STATUS",
        "0 after SIGTERM or SIGINT; 78 for a bad netperm-table; 64 for a usage error.",
    ]
    lines += _see_also("smapd")
    return "\n".join(lines) + "\n"


def smap_page() -> str:
    lines = _head("smap", 8, "the SMTP receiver, one process per connection (FWTK smap)")
    lines += [
        ".SH SYNOPSIS",
        f".B smap\n{opt('[-t netperm-table]')}",
        ".SH DESCRIPTION",
        "inetd, xinetd or a systemd socket with",
        ".B Accept=yes",
        "starts one smap per SMTP connection, as root, with the connection on file",
        "descriptors 0 and 1. smap reads the netperm-table, opens syslog (facility mail),",
        "chroots into",
        ".BR directory ,",
        "drops to",
        ".B userid",
        "(never root) with no supplementary groups, and speaks SMTP. Each message is",
        "committed to the queue database, with its audit events, before the client sees",
        ".BR 250 .",
        "It is the same program as",
        f".BR {opt('smapq receive')},",
        "without the start-up cost of the administrator's tool.",
        ".PP",
        "No client ever sees a traceback: any failure before the banner answers",
        ".B 421",
        "and exits.",
        ".SH OPTIONS",
        ".TP",
        f".B {opt('-t')} \\fIPATH\\fR",
        "The netperm-table (default:",
        ".BR SMAPQ_TABLE ,",
        "else",
        ".IR /usr/local/etc/netperm-table ).",
        ".SH CONFIGURATION",
        "The smap lines of",
        ".BR netperm-table (5):",
    ]
    lines += keyword_entries([k for k in KEYS if SMAP in k.programs], show_programs=False)
    lines += [
        ".SH EXIT STATUS",
        "0 after a session; 64 usage; 75 database unavailable; 77 jail failure;",
        "78 configuration error; 70 internal error.",
        ".SH EXAMPLE",
        "An",
        ".I /etc/inetd.conf",
        "line:",
        ".PP",
        ".nf",
        opt(INETD_LINE),
        ".fi",
    ]
    lines += _see_also("smap")
    return "\n".join(lines) + "\n"


def netperm_page(keys: Sequence[Key] = KEYS) -> str:
    lines = _head("netperm-table", 5, "configuration of smap and smapd (FWTK syntax)")
    lines += [
        ".SH DESCRIPTION",
        "The TIS Firewall Toolkit's configuration file, read by",
        ".BR smap (8),",
        ".BR smapd (8)",
        "and",
        ".BR smapq (8).",
        "Each line is",
        ".PP",
        ".RS",
        ".I program\\fR[\\fB,\\fIprogram\\fR...]\\fB: \\fIkeyword argument",
        ".RE",
        ".PP",
        "A line applies to the programs it names, or to every program with",
        ".BR * .",
        "Lines starting with",
        ".B #",
        "are comments. Lines for other programs (ftp-gw, http-gw, ...) are ignored. The",
        "first line that sets a keyword for a program wins. Every keyword takes exactly",
        "one argument. A line that cannot be used stops the program with",
        f"{opt('file:line: keyword: reason')} and exit status 78.",
        ".PP",
        "The file must belong to root (or the invoking user) and must not be writable by",
        "group or others; FWTK's advice was mode 600.",
        ".SH KEYWORDS",
    ]
    lines += keyword_entries(keys, show_programs=True)
    lines += [
        ".SH EXAMPLE",
        "The FWTK sample works unchanged:",
        ".PP",
        ".nf",
        "smap, smapd: userid 5",
        "smap, smapd: directory /var/spool/smap",
        "smapd: executable /usr/local/etc/smapd",
        "smapd: sendmail /usr/lib/sendmail",
        "smapd: baddir /var/spool/smap/bad",
        "smap: timeout 3600",
        ".fi",
        ".PP",
        f".B {opt('smapq check-config')}",
        "prints every effective setting and the line it came from.",
    ]
    lines += _see_also("netperm-table")
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """Relative path under share/man -> page text."""
    from .deliver import smapd_cmd  # noqa: PLC0415
    from .main import cli  # noqa: PLC0415

    return {
        "man8/smapq.8": smapq_page(cli),
        "man8/smapd.8": smapd_page(smapd_cmd),
        "man8/smap.8": smap_page(),
        "man5/netperm-table.5": netperm_page(),
    }


def write_pages(directory: str) -> list[str]:
    written = []
    for rel, text in pages().items():
        path = os.path.join(directory, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_pages(sys.argv[1] if len(sys.argv) > 1 else "man"):
        print(written_path)
