"""``smapq db grant`` and ``smapq db copy``: running a queue on PostgreSQL.

grant sets up the least-privilege group roles (smapq.store.grants); copy moves a
SQLite queue into PostgreSQL (smapq.store.copy). Both take the admin's URL: grant
from ``--url`` or the table's database, copy from ``--to``.
"""

from __future__ import annotations

import os
import sys
import time

import click
from sqlalchemy import Engine

from smapq.errors import EX_IOERR, SmapqError, UsageError
from smapq.report.db import translated
from smapq.store import damage, grants
from smapq.store.engine import make_engine

from .common import State, echo_lines, pass_state
from .progress import Progress


def _server_engine(url: str, what: str) -> Engine:
    if "://" not in url or url.startswith("sqlite"):
        raise UsageError(f"{what} must be a PostgreSQL URL (postgresql+psycopg://...)")
    return make_engine(url)


@click.command("grant")
@click.option(
    "--url",
    metavar="URL",
    help="connect as this admin (default: the table's database URL)",
)
@click.option(
    "--prefix",
    default=grants.DEFAULT_PREFIX,
    show_default=True,
    help="role names are PREFIX_receiver, PREFIX_deliverer, PREFIX_report",
)
@click.option("--sql", "print_sql", is_flag=True, help="print the SQL for a DBA, run nothing")
@pass_state
def db_grant(state: State, url: str | None, prefix: str, print_sql: bool) -> None:
    """Create or update the receiver, deliverer and report roles on PostgreSQL.

    Three NOLOGIN group roles get exactly the privileges their programs need: the
    receiver may insert mail and read nothing back, the deliverer works the queue,
    the report role may only read. Re-running resets them (idempotent). Make login
    roles members of them, e.g. CREATE ROLE mx1 LOGIN IN ROLE smapq_receiver; see
    docs/postgresql.md.
    """
    try:
        grants.check_prefix(prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if print_sql:
        click.echo(f"-- smapq db grant --prefix {prefix}: run as the owner of the queue's tables")
        click.echo("BEGIN;")
        for stmt in grants.statements(prefix):
            click.echo(stmt + ";")
        click.echo("COMMIT;")
        return
    engine = _server_engine(url or state.config.smap.database, "db grant: the database")
    try:
        with translated("db grant"), engine.begin() as conn:
            lines = grants.apply(conn, prefix)
    finally:
        engine.dispose()
    echo_lines(lines)


@click.command("copy")
@click.option("--to", "to_url", required=True, metavar="URL", help="the PostgreSQL database")
@click.option(
    "--from",
    "from_file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="the SQLite queue to copy (default: the table's database)",
)
@click.option(
    "--chunk",
    type=click.IntRange(1, 100_000),
    default=500,
    show_default=True,
    help="messages per committed transaction",
)
@click.option("--quiet", "-q", is_flag=True, help="no progress line, even on a terminal")
@pass_state
def db_copy(state: State, to_url: str, from_file: str | None, chunk: int, quiet: bool) -> None:
    """Copy the table's SQLite queue into the PostgreSQL database URL.

    Stop the receivers and deliverers first. Every message (waiting, held,
    deferred, bad, delivered; mail being delivered is released and due at once),
    its recipients and the envelope log are copied as they are; an empty target
    gets its schema first. Interrupted, run it again: it goes on where it
    stopped. Prints the counts per table; exit 1 if source and target differ.
    """
    from smapq.store import copy  # noqa: PLC0415 (alembic and psycopg: this verb only)

    path = from_file or state.database_file()
    if not os.path.isfile(path):
        raise SmapqError(f"{path}: no such SQLite queue database")
    note = damage.note(path)
    if note is not None:
        raise SmapqError(
            f"queue database {path} was found damaged ({note}): run 'smapq db verify' "
            "and 'smapq db recover' first (docs/recovery.md)",
            EX_IOERR,
        )
    target = _server_engine(to_url, "--to")
    source = make_engine(path, readonly=True)
    try:
        with Progress("db copy") as show, translated("db copy"):
            show.on = show.on and not quiet
            result = copy.copy_queue(source, target, time.time(), chunk, show)
    finally:
        source.dispose()
        target.dispose()
    if result.schema_made:
        click.echo(f"schema {result.schema_made} made in the target")
    if result.resumed:
        click.echo("resumed an interrupted copy")
    click.echo(f"{'table':12} {'source':>10} {'copied':>10} {'target':>10}")
    for c in result.counts:
        click.echo(f"{c.table:12} {c.source:>10} {c.copied:>10} {c.target:>10}")
    if result.released:
        click.echo(f"{result.released} message(s) being delivered: lease released, due now")
    sys.stdout.flush()
    bad = result.mismatches()
    if bad:
        what = ", ".join(f"{c.table} {c.target} (expected {c.expected})" for c in bad)
        raise SmapqError(f"db copy: counts differ in the target: {what}")
    click.echo(
        "copy complete: set 'smap, smapd: database' in the netperm-table to the new URL",
        err=True,
    )
