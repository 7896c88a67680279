"""Administration commands: init, check-config, and db upgrade|current|check|downgrade,
db verify|recover (a damaged queue database)."""

from __future__ import annotations

import os
from types import ModuleType

import click

from smapq import spool

from .common import Group, State, echo_lines, pass_state


def _migrate() -> ModuleType:
    # alembic costs ~70 ms to import; only init and db need it, not every command.
    from smapq.store import migrate  # noqa: PLC0415

    return migrate


@click.command("init")
@pass_state
def init_cmd(state: State) -> None:
    """Create the spool, baddir and the migrated queue database (idempotent)."""
    config = state.config
    done = spool.init(config)
    echo_lines(done or [f"{config.smap.directory}: spool is ready, nothing to change"])
    for warning in config.warnings():
        click.echo(f"smapq: warning: {warning}", err=True)


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, frozenset):
        return ",".join(str(v) for v in sorted(value))
    if isinstance(value, tuple):  # every line of a multi-line keyword
        return " | ".join(str(v) for v in value)
    return str(value)


@click.command("check-config")
@pass_state
def check_config_cmd(state: State) -> None:
    """Print the effective settings and check the machine against them.

    Every setting of smap and smapd and where it came from, then what the table's
    choices imply (warnings), then one line per problem found on this machine: the
    spool, the queue database and its -wal/-shm files (owners, modes, access by
    smap's and smapd's uids), baddir, sendmail, the schema, free space against the
    intake's reserve. Exit 1 if there is any problem.
    """
    from smapq import machine  # noqa: PLC0415

    config = state.config
    click.echo(f"# {config.path}")
    for settings in (config.smap, config.smapd):
        for name, value, origin in settings.items():
            click.echo(f"{settings.program + ':':7} {name:16} {_show(value):32} # {origin}")
    for warning in config.warnings():
        click.echo(f"smapq: warning: {warning}", err=True)
    found = machine.problems(config, lambda: _schema_problem(state))
    for problem in found:
        click.echo(f"smapq: problem: {problem}", err=True)
    if found:
        raise click.exceptions.Exit(1)


def _schema_problem(state: State) -> str | None:
    from sqlalchemy.exc import DBAPIError  # noqa: PLC0415

    from smapq.store import faults  # noqa: PLC0415

    migrate = _migrate()
    try:
        engine = state.engine(readonly=True)
        try:
            migrate.require_current(engine)
        finally:
            engine.dispose()
    except DBAPIError as exc:
        return f"queue database: {faults.describe(exc)}"
    return None


@click.group("db", cls=Group)
def db_group() -> None:
    """The queue database: migrations, checks, repair, PostgreSQL roles, moving a queue."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@pass_state
def db_upgrade(state: State, revision: str) -> None:
    """Migrate the queue database to REVISION (default: head)."""
    migrate = _migrate()
    engine = state.engine()
    before = migrate.current_revision(engine)
    migrate.upgrade(engine, revision)
    after = migrate.current_revision(engine)
    click.echo(f"schema {before or 'empty'} -> {after}" if before != after else f"schema {after}")


@db_group.command("downgrade")
@click.argument("revision")
@pass_state
def db_downgrade(state: State, revision: str) -> None:
    """Migrate the queue database down to REVISION ('base' drops everything)."""
    migrate = _migrate()
    engine = state.engine()
    migrate.downgrade(engine, revision)
    click.echo(f"schema {migrate.current_revision(engine) or 'empty'}")


@db_group.command("current")
@pass_state
def db_current(state: State) -> None:
    """Print the schema revision of the queue database."""
    click.echo(_migrate().current_revision(state.engine(readonly=True)) or "empty")


@db_group.command("check")
@pass_state
def db_check(state: State) -> None:
    """Exit non-zero unless the queue database is at the newest schema."""
    migrate = _migrate()
    engine = state.engine(readonly=True)
    migrate.require_current(engine)
    click.echo(f"schema {migrate.head_revision(engine)} is current")


@db_group.command("verify")
@pass_state
def db_verify(state: State) -> None:
    """Check the queue database for damage: pages, indexes, keys, schema, bodies.

    Exit 0 when it is sound (and any note that it was found damaged is removed),
    1 with one line per problem otherwise. See docs/recovery.md.
    """
    from smapq.store import damage, verify  # noqa: PLC0415

    path = state.database_file()
    migrate = _migrate()
    found = verify.verify(path, migrate.head_revision(state.engine(readonly=True)))
    if found.problems:
        damage.mark(path, found.problems[0], "smapq db verify")
        for problem in found.problems:
            click.echo(f"smapq: {path}: {problem}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"ok: {path}: pages, indexes, keys and schema sound; {found.bodies} bodies match")


@db_group.command("recover")
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    help="the new database (default: the queue database's name + .recovered)",
)
@pass_state
def db_recover(state: State, output: str | None) -> None:
    """Copy every readable message of a damaged queue database into a new one.

    Prints what was recovered and names every message the envelope log shows
    accepted that could not be (exit 1 then). The damaged file is only read;
    install the new one as docs/recovery.md says.
    """
    from smapq.store import recover  # noqa: PLC0415
    from smapq.store.engine import make_engine  # noqa: PLC0415

    migrate = _migrate()
    path = state.database_file()
    out = output or path + ".recovered"

    def create_schema(target: str) -> None:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        engine = make_engine(target, create=True)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()

    result = recover.recover(path, out, create_schema)
    echo_lines(result.lines(out))
    if result.unaccounted:
        raise click.exceptions.Exit(1)
