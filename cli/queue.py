"""``smapq queue …``: list/show/export, and requeue/hold/release/delete/purge.

Only parses options and calls ``smapq.report.queue``. Verbs that change state ask for no
confirmation but print one line per message they changed (or left alone, and why);
``--dry-run`` shows the same lines without writing. Any message left unchanged makes the
exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from smapq.errors import SmapqError, UsageError
from smapq.report import mailq, output, timespec
from smapq.report import queue as q
from smapq.report.db import readonly_session, translated

from .common import Group, State, pass_state
from .progress import Progress
from .report import format_option, width_option


@click.group("queue", cls=Group, invoke_without_command=True)
@click.pass_context
def queue_group(ctx: click.Context) -> None:
    """Look at and operate on queued messages (postqueue/postsuper for smapq).

    Alone, 'smapq queue' is 'smapq queue list': the mail still waiting, like mailq.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


def _duration(option: str, value: str | None) -> float | None:
    return None if value is None else timespec.parse_duration(value, option)


@queue_group.command("list")
@click.option(
    "--state",
    "queue_states",
    multiple=True,
    metavar="STATE",
    help="only these (repeatable): received, deferred, delivering, held, delivered, bad",
)
@click.option(
    "--all", "-a", "all_states", is_flag=True, help="every message, delivered and bad too"
)
@click.option("--sender", metavar="PATTERN", help="envelope sender; * and ? are wildcards")
@click.option("--recipient", metavar="PATTERN", help="any recipient; * and ? are wildcards")
@click.option("--client", metavar="PATTERN", help="client address; * and ? are wildcards")
@click.option("--older-than", metavar="AGE", help="received more than AGE ago (30m, 2h, 7d)")
@click.option("--newer-than", metavar="AGE", help="received less than AGE ago")
@click.option("--after", metavar="QUEUE_ID", help="start after this message (next page)")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=q.DEFAULT_PAGE,
    show_default=True,
    help="messages per page (0: all, streamed)",
)
@format_option
@width_option
@pass_state
def list_cmd(
    state: State,
    /,
    queue_states: tuple[str, ...],
    all_states: bool,
    sender: str | None,
    recipient: str | None,
    client: str | None,
    older_than: str | None,
    newer_than: str | None,
    after: str | None,
    limit: int,
    fmt: str,
    width: int,
) -> None:
    """The mail still waiting, like mailq: status, size, age, sender, last result and the
    recipients left (--all: every message). Queue order, one page at a time (--after
    continues)."""
    now = time.time()
    older = _duration("--older-than", older_than)
    newer = _duration("--newer-than", newer_than)
    with readonly_session(state.engine(readonly=True)) as conn:
        report = q.list_messages(
            conn,
            now,
            queue_states=queue_states,
            all_states=all_states,
            sender=sender,
            recipient=recipient,
            client=client,
            older_than=older,
            newer_than=newer,
            after=after,
            limit=limit or None,
        )
        if fmt == "table":
            mailq.write(report, sys.stdout, width, now)
            for note in report.notes:
                click.echo(f"note: {note}", err=True)
        else:
            output.write(report, fmt, sys.stdout, sys.stderr, width)


def _show_table(info: dict[str, Any], width: int) -> None:
    out = sys.stdout
    skip = {"recipients", "events", "headers"}
    room = max(width - 18, 20) if width else 10**9
    for key, value in info.items():
        if key in skip:
            continue
        # Multi-line values (the Received: trace) print one line each, indented.
        lines = str("-" if value is None else value).replace("\r\n", "\n").split("\n")
        lines = [line.replace("\t", "    ") for line in lines if line] or [""]
        for n, line in enumerate(lines):
            label = f"{key}:" if n == 0 else ""
            out.write(f"{label:18}{output.fit(output.cell('text', line), room)}\n")
    sections: list[tuple[str, list[output.Column], list[tuple[Any, ...]]]] = [
        (
            "recipients",
            [
                output.Column("address", flex=True),
                output.Column("sent_at", title="SENT"),
                output.Column("last_result", title="RESULT", flex=True),
            ],
            [(r["address"], r["sent_at"], r["last_result"]) for r in info["recipients"]],
        ),
        (
            "events",
            [
                output.Column("at"),
                output.Column("kind"),
                output.Column("code", "int"),
                output.Column("client_addr", title="CLIENT"),
                output.Column("address", flex=True),
                output.Column("detail", flex=True),
            ],
            [
                (e["at"], e["kind"], e["code"], e["client_addr"], e["address"], e["detail"])
                for e in info["events"]
            ],
        ),
        (
            "headers",
            [output.Column("name"), output.Column("value", flex=True)],
            [(h["name"], h["value"]) for h in info["headers"]],
        ),
    ]
    for title, columns, rows in sections:
        out.write(f"\n{title}:\n")
        report = output.Report(title, columns, rows)
        output.write_table(report, out, width)


@queue_group.command("show")
@click.argument("queue_id")
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for programs",
)
@width_option
@pass_state
def show_cmd(state: State, /, queue_id: str, fmt: str, width: int) -> None:
    """Envelope, recipients, events timeline (with its SMTP session) and headers."""
    with readonly_session(state.engine(readonly=True)) as conn:
        info = q.show(conn, queue_id)
    if fmt == "json":
        sys.stdout.write(json.dumps(info, indent=1) + "\n")
    else:
        _show_table(info, width)


@queue_group.command("export")
@click.argument("queue_id")
@click.option(
    "--output",
    "-o",
    "path",
    metavar="FILE",
    help="write the .eml here (created 0600, never overwritten) instead of stdout",
)
@pass_state
def export_cmd(state: State, /, queue_id: str, path: str | None) -> None:
    """Write one message as an .eml file (smap's Received: line, then the body)."""
    if path is None:
        with translated("queue database"):
            data = q.export(state.engine(), queue_id, "stdout", time.time())
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        return
    if os.path.lexists(path):
        raise UsageError(f"{path}: exists; not overwriting it")
    # The file first: the 'exported' event must not name a file that could not be made.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise SmapqError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        try:
            with translated("queue database"):
                data = q.export(state.engine(), queue_id, path, time.time())
            f.write(data)
        except BaseException:
            os.unlink(path)
            raise
    click.echo(f"{queue_id}: exported to {path} ({len(data)} bytes)")


def _report(verb: str, outcomes: list[q.Outcome], dry_run: bool) -> None:
    for o in outcomes:
        click.echo(o.line(dry_run))
    changed = sum(1 for o in outcomes if o.changed)
    left = len(outcomes) - changed
    word = "would change" if dry_run else "changed"
    click.echo(f"{verb}: {word} {changed} of {len(outcomes)} message(s)", err=True)
    if left:
        raise SmapqError(f"{verb}: {left} of {len(outcomes)} message(s) left unchanged")


def _verb(name: str, doc: str, all_bad: bool = False) -> None:
    @click.argument("queue_ids", nargs=-1, metavar="QUEUE_ID...")
    @click.option("--dry-run", "-n", is_flag=True, help="say what would change, change nothing")
    @pass_state
    def cmd(state: State, /, queue_ids: tuple[str, ...], dry_run: bool, **kw: Any) -> None:
        with translated("queue database"):
            outcomes = q.change(
                state.engine(),
                name,
                queue_ids,
                time.time(),
                all_bad=bool(kw.get("all_bad")),
                dry_run=dry_run,
                baddir=state.config.smapd.baddir,
            )
        _report(name, outcomes, dry_run)

    if all_bad:
        cmd = click.option("--all-bad", is_flag=True, help="every message in state bad")(cmd)
    queue_group.command(name, help=doc)(cmd)


_verb(
    "requeue",
    "Put messages (deferred, bad or held) back to received, due now (postsuper -r); "
    "a bad message's baddir copies are removed.",
    all_bad=True,
)
_verb("hold", "Hold messages: never claimed, never expire, until released (postsuper -h).")
_verb("release", "Release held messages: back to received, due now (postsuper -H).")
_verb(
    "delete",
    "Delete messages, their recipients and their baddir copies (postsuper -d). A message "
    "in delivery under a live lease is left alone and reported; run delete again after "
    "the attempt.",
)


@queue_group.command("purge")
@click.option("--older-than", required=True, metavar="AGE", help="retention, e.g. 30d")
@click.option("--bad", "include_bad", is_flag=True, help="also purge bad mail failed before AGE")
@click.option("--keep-rows", is_flag=True, help="drop only the bodies; keep envelopes for reports")
@click.option("--dry-run", "-n", is_flag=True, help="count what would go, change nothing")
@click.option(
    "--batch",
    type=click.IntRange(min=1, max=100000),
    default=q.PURGE_BATCH,
    show_default=True,
    help="messages per transaction",
)
@pass_state
def purge_cmd(
    state: State, /, older_than: str, include_bad: bool, keep_rows: bool, dry_run: bool, batch: int
) -> None:
    """Retention: bodies of delivered mail older than AGE, then its rows.

    Runs in short transactions so receivers and deliverers keep working; the envelope
    log (events) is kept and gains one 'purged' event per message.
    """
    now = time.time()
    cutoff = now - timespec.parse_duration(older_than, "--older-than")
    with Progress("purge") as show, translated("queue database"):
        result = q.purge(
            state.engine(),
            cutoff,
            now,
            include_bad=include_bad,
            keep_rows=keep_rows,
            dry_run=dry_run,
            batch=batch,
            progress=lambda r: show(f"{r.messages} messages ..."),
            baddir=state.config.smapd.baddir,
        )
    what = "would purge" if dry_run else "purged"
    click.echo(
        f"{what} {result.messages} message(s) final before {timespec.iso(cutoff)}: "
        f"{result.bodies} bodies dropped, {result.rows} rows deleted"
        + (f", {result.baddir_removed} baddir copies removed" if result.baddir_removed else "")
    )
    for left in result.baddir_left:
        click.echo(f"smapq: warning: {left}", err=True)
