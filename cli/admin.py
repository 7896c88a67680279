"""Administration commands: init, check-config, db upgrade|current|check|downgrade."""

from __future__ import annotations

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
    return str(value)


@click.command("check-config")
@pass_state
def check_config_cmd(state: State) -> None:
    """Print the effective settings of smap and smapd and where each came from."""
    config = state.config
    click.echo(f"# {config.path}")
    for settings in (config.smap, config.smapd):
        for name, value, origin in settings.items():
            click.echo(f"{settings.program + ':':7} {name:16} {_show(value):32} # {origin}")
    for warning in config.warnings():
        click.echo(f"smapq: warning: {warning}", err=True)


@click.group("db", cls=Group)
def db_group() -> None:
    """Schema migrations of the queue database."""


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
