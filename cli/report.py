"""``smapq report …``: audits of the queue and its envelope log, and Prometheus metrics.

Only parses options and calls ``smapq.report``; every report reads through a read-only
engine (SQLite ``mode=ro`` + ``query_only``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TextIO

import click

from smapq.errors import SmapqError, UsageError
from smapq.report import daily, daily_html, daily_text, output, reports, sql, timespec
from smapq.report import metrics as metrics_mod
from smapq.report.db import readonly_session
from smapq.report.timespec import window

from .common import Group, State, pass_state

F = Callable[..., Any]


def window_options(top_default: int | None) -> Callable[[F], F]:
    """--since/--until/--format/--width, and --top when the report is a ranking."""

    def deco(f: F) -> F:
        f = width_option(f)
        f = format_option(f)
        if top_default is not None:
            f = click.option(
                "--top",
                "-n",
                type=click.IntRange(min=1),
                default=top_default,
                show_default=True,
                help="rows to show",
            )(f)
        f = click.option(
            "--until", metavar="WHEN", help="end of the window (exclusive), same forms as --since"
        )(f)
        return click.option(
            "--since",
            metavar="WHEN",
            help="window start: ISO date/time (UTC), e.g. 2026-11-25T09:00, or an age: 1h, 7d",
        )(f)

    return deco


def width_option(f: F) -> F:
    return click.option(
        "--width",
        type=int,
        default=output.TABLE_WIDTH,
        show_default=True,
        help="table width; long cells are cut with '…' (0: never cut)",
    )(f)


def format_option(f: F) -> F:
    return click.option(
        "--format",
        "-f",
        "fmt",
        type=click.Choice(output.FORMATS),
        default="table",
        show_default=True,
        help="table for people; csv or json (stable, see docs/reports.md) for programs",
    )(f)


def _emit(report: output.Report, fmt: str, width: int) -> None:
    output.write(report, fmt, sys.stdout, sys.stderr, width)


def run_report(
    state: State,
    build: Callable[..., output.Report],
    opts: dict[str, Any],
    **extra: Any,
) -> None:
    now = time.time()
    since, until = window(opts.get("since"), opts.get("until"), now)
    w = reports.Window(since, until, now, opts.get("top") or reports.DEFAULT_TOP)
    with readonly_session(state.report_engine()) as conn:
        _emit(build(conn, w, **extra), opts["fmt"], opts["width"])


@click.group("report", cls=Group)
def report_group() -> None:
    """Audits of the queue and the envelope log (read-only).

    Times are UTC. Every report takes --format table|csv|json; json is the stable,
    documented format for programs.
    """


def _simple(name: str, build: Callable[..., output.Report], top: int | None, doc: str) -> None:
    @report_group.command(name, help=doc)
    @window_options(top)
    @pass_state
    def cmd(state: State, /, **opts: Any) -> None:
        run_report(state, build, opts)


_simple(
    "summary",
    reports.summary,
    None,
    "Messages per state, deferred, oldest waiting, bytes, delivered and bad in the window.",
)
_simple("senders", reports.senders, reports.DEFAULT_TOP, "Top senders: messages, bytes, refused.")
_simple(
    "recipients",
    reports.recipients,
    reports.DEFAULT_TOP,
    "Top recipients: messages, bytes, refused.",
)
_simple(
    "clients",
    reports.clients,
    reports.DEFAULT_TOP,
    "Top clients (address, name): messages, bytes, refused.",
)
_simple(
    "deferred",
    reports.deferred,
    reports.DEFAULT_LIST,
    "Messages waiting for a retry: attempts, next attempt, last result; oldest first.",
)
_simple(
    "bad",
    reports.bad,
    reports.DEFAULT_LIST,
    "Messages in state bad: attempts, last result; most recent failure first.",
)
_simple(
    "sessions",
    reports.sessions,
    reports.DEFAULT_TOP,
    "SMTP connections by client: accepted, refused, VRFY/EXPN, timeouts, TLS, last seen.",
)
_simple(
    "tls",
    reports.tls,
    reports.DEFAULT_TOP,
    "STARTTLS sessions by TLS version and cipher, and their share of connections.",
)


@report_group.command("refused")
@window_options(reports.DEFAULT_TOP)
@click.option(
    "--by",
    type=click.Choice(["client", "rule"]),
    default="client",
    show_default=True,
    help="client: refusals, probes and timeouts by client and reply code; rule: "
    "refusals by the access-policy rule (file:line) or built-in check that made them",
)
@pass_state
def refused_cmd(state: State, /, by: str, **opts: Any) -> None:
    """Refused commands, VRFY/EXPN probes and timeouts by client and reply code, or
    refusals by the rule that refused them (--by rule)."""
    build = reports.refused_by_rule if by == "rule" else reports.refused
    run_report(state, build, opts)


@report_group.command("latency")
@window_options(None)
@click.option(
    "--per",
    type=click.Choice(sorted(reports.PERIODS)),
    help="bucket size [default: hour for windows up to two days, else day]",
)
@pass_state
def latency_cmd(state: State, /, per: str | None, **opts: Any) -> None:
    """Receipt-to-delivery time: p50/p90/p99/max per hour or day of delivery."""
    run_report(state, reports.latency, opts, per=per)


@report_group.command("age")
@window_options(reports.DEFAULT_TOP)
@click.option(
    "--state",
    "queue_states",
    multiple=True,
    type=click.Choice(["received", "delivering", "held"]),
    help="waiting states to count (repeatable) [default: received, delivering]",
)
@pass_state
def age_cmd(state: State, /, queue_states: tuple[str, ...], **opts: Any) -> None:
    """qshape: waiting recipients by domain and age (5, 10, 20 … 1280+ minutes)."""
    run_report(state, reports.age, opts, queue_states=queue_states)


@report_group.command("daily")
@click.option(
    "--day",
    metavar="DAY",
    help="one UTC day: today, yesterday or 2026-11-25 (instead of --since/--until)",
)
@click.option("--since", metavar="WHEN", help="window start [default: 24 hours ago]")
@click.option("--until", metavar="WHEN", help="window end (exclusive) [default: now]")
@click.option(
    "--top",
    "-n",
    type=click.IntRange(min=1),
    default=daily.DEFAULT_TOP,
    show_default=True,
    help="rows in each ranking",
)
@click.option(
    "--html",
    "html_path",
    metavar="FILE",
    help="write one self-contained HTML page with SVG charts to FILE instead",
)
@width_option
@pass_state
def daily_cmd(
    state: State,
    /,
    day: str | None,
    since: str | None,
    until: str | None,
    top: int,
    html_path: str | None,
    width: int,
) -> None:
    """The day's mail, like pflogsumm: totals, traffic per hour, top senders, recipients
    and clients, refusals by reason, deferral reasons, bad mail, latency, queue age.

    For cron: 'smapq report daily --day yesterday | mail -s "smapq daily" postmaster'.
    """
    now = time.time()
    if day is not None:
        if since or until:
            raise UsageError("--day excludes --since and --until")
        lo, hi = timespec.day(day, now)
    else:
        start, end = window(since or "24h", until, now)
        lo, hi = float(start if start is not None else now - 86400), end or now
    host = state.config.smap.hostname or socket.gethostname()
    with readonly_session(state.engine(readonly=True)) as conn:
        d = daily.collect(conn, lo, hi, now, host, top)
    if html_path is None:
        daily_text.write(d, sys.stdout, width)
        return
    _write_file(html_path, lambda out: daily_html.write(d, out))


def _write_file(path: str, render: Callable[[TextIO], None]) -> None:
    """Write ``path`` whole or not at all: a temporary file renamed into place."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".smapq-", dir=directory)
    except OSError as exc:
        raise SmapqError(f"{path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            render(out)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SmapqError(f"{path}: {exc.strerror or exc}") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@report_group.command("sql")
@click.argument("statement")
@click.option("--limit", type=click.IntRange(min=1), help="stop after this many rows")
@format_option
@width_option
@pass_state
def sql_cmd(state: State, statement: str, limit: int | None, fmt: str, width: int) -> None:
    """Run one read-only SQL statement; writes are impossible, not filtered.

    Example: smapq report sql "SELECT state, count(*) FROM messages GROUP BY state"
    """
    with readonly_session(state.report_engine()) as conn:
        _emit(sql.run(conn, statement, time.time(), limit), fmt, width)


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen: {value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@report_group.command("metrics")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    help="serve GET /metrics over HTTP instead of printing once (e.g. 127.0.0.1:9469)",
)
@pass_state
def metrics_cmd(state: State, listen: str | None) -> None:
    """Prometheus text format: messages by state, oldest age, attempts, counters."""
    engine = state.report_engine()

    def scrape() -> str:
        with readonly_session(engine) as conn:
            return metrics_mod.render(conn, time.time())

    if listen is None:
        sys.stdout.write(scrape())
        return
    host, port = _listen(listen)
    scrape()  # fail now, in one line, if the database cannot be read
    click.echo(f"smapq: serving metrics on http://{host}:{port}/metrics", err=True)
    metrics_mod.serve(host, port, scrape)
