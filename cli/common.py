"""What every command shares: the table option, loading settings, opening the queue.

``-t/--table`` works in every position (``smapq -t T report summary`` and ``smapq
report summary -t T`` alike): ``Group.add_command`` gives it to each command it
registers, at any depth, so a new command gets it by being added. The innermost one
given wins.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from smapq.config.netperm import table_path
from smapq.config.settings import Config, load
from smapq.errors import EX_IOERR, SmapqError, UsageError
from smapq.store import damage, verify

if TYPE_CHECKING:
    from sqlalchemy import Engine

TABLE_HELP = "netperm-table to read [env SMAPQ_TABLE; default /usr/local/etc/netperm-table]"


class State:
    """Per-invocation state carried on the click context."""

    def __init__(self, table: str | None) -> None:
        self.table = table_path(table)
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load(self.table)
        return self._config

    def database_file(self) -> str:
        """The queue database file (outside the jail); an error for a server URL."""
        smap = self.config.smap
        if smap.database_is_url:
            raise UsageError(
                "the queue database is a server URL, not a file: use the server's own tools"
            )
        path = smap.database_path
        if not os.path.exists(path):
            raise SmapqError(f"queue database {path} does not exist: run 'smapq init'")
        return path

    def report_engine(self) -> Engine:
        """A read-only engine for reports, refused while the database is noted damaged:
        numbers read from a damaged file can be wrong without any error."""
        smap = self.config.smap
        if not smap.database_is_url and os.path.exists(smap.database_path):
            note = damage.note(smap.database_path)
            if note is None:
                found = verify.quick(smap.database_path)
                if found is not None:
                    damage.mark(smap.database_path, found, "smapq report")
                    note = found
            if note is not None:
                raise SmapqError(
                    f"queue database {smap.database_path} was found damaged ({note}); its "
                    "numbers could be wrong: run 'smapq db verify' (docs/recovery.md)",
                    EX_IOERR,
                )
        return self.engine(readonly=True)

    def engine(self, readonly: bool = False) -> Engine:
        """The queue database as seen from outside the jail; it must exist already.

        Only ``smapq init`` creates it (with the owner and mode the table asks for), so
        a missing file is one line here, not a traceback or a new empty database.
        """
        # Imported here: SQLAlchemy is most of a command's start-up, and only the
        # commands that open the queue need it (smapq --help, serve, receive do not).
        from smapq.store.engine import make_engine  # noqa: PLC0415

        smap = self.config.smap
        if smap.database_is_url:
            return make_engine(smap.database, readonly=readonly)
        path = smap.database_path
        if not os.path.exists(path):
            raise SmapqError(f"queue database {path} does not exist: run 'smapq init'")
        return make_engine(path, readonly=readonly)


pass_state = click.make_pass_decorator(State)


def _take_table(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    # Runs while the subcommand parses, after the root callback made the State.
    if value:
        state = ctx.find_object(State)
        if state is None:  # a command run on its own (tests, man page rendering)
            state = ctx.obj = State(value)
        state.table = table_path(value)
        state._config = None


def table_option() -> click.Option:
    """``-t/--table PATH`` for a subcommand: sets the State's table, passes nothing."""
    return click.Option(
        ["-t", "--table"],
        metavar="PATH",
        expose_value=False,
        callback=_take_table,
        help="netperm-table to read (same as 'smapq -t PATH')",
    )


def with_table(cmd: click.Command) -> click.Command:
    """Give ``cmd`` (and, for a group, every command in it) the ``-t/--table`` option."""
    if not any("--table" in getattr(p, "opts", ()) for p in cmd.params):
        cmd.params.append(table_option())
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            with_table(sub)
    return cmd


class Group(click.Group):
    """A command group whose commands, at any depth, all take ``-t/--table``."""

    group_class = type  # subgroups made with @group.group() are Groups too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        super().add_command(with_table(cmd), name)


def echo_lines(lines: list[str], **kwargs: Any) -> None:
    for line in lines:
        click.echo(line, **kwargs)
