"""``smapq``: the command line. Parses options, calls the engine, reports errors in one line.

Every ``SmapqError`` becomes ``smapq: <message>`` on stderr and the error's exit code
(78 for a bad netperm-table); a click usage error becomes one line and exit 64; a
database error no command translated itself (a damaged or unreadable queue database)
becomes ``smapq: queue database: <reason>`` and exit 1. Bugs are not swallowed:
anything else is a traceback and exit 70.

Each command's module is imported when the command is looked up (``LazyCommands``):
a run imports what its own command needs -- not the report renderers for ``smapq
deliver``, nor SQLAlchemy (most of a start-up's CPU) for ``smapq --help`` or ``smapq
serve``. The tree is whole to whoever walks it (help, man pages, tests).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator, MutableMapping

import click

from smapq import __version__
from smapq.errors import EX_SOFTWARE, EX_USAGE, SmapqError

from .common import TABLE_HELP, Group, State, with_table


def _attr(module: str, name: str) -> Callable[[], click.Command]:
    def load() -> click.Command:
        cmd = getattr(importlib.import_module(module, __package__), name)
        assert isinstance(cmd, click.Command)
        return cmd

    return load


def _db_group() -> click.Command:
    from .admin import db_group  # noqa: PLC0415
    from .dbops import db_copy, db_grant  # noqa: PLC0415

    db_group.add_command(db_grant)
    db_group.add_command(db_copy)
    return db_group


# The root's commands: name -> what imports and returns it.
COMMANDS: dict[str, Callable[[], click.Command]] = {
    "init": _attr(".admin", "init_cmd"),
    "check-config": _attr(".admin", "check_config_cmd"),
    "db": _db_group,
    "receive": _attr(".receive", "receive_cmd"),
    "serve": _attr(".serve", "serve_cmd"),
    "deliver": _attr(".deliver", "deliver_cmd"),
    "report": _attr(".report", "report_group"),
    "queue": _attr(".queue", "queue_group"),
    "import-spool": _attr(".importspool", "import_spool_cmd"),
}


class LazyCommands(MutableMapping[str, click.Command]):
    """A group's commands, each loaded (imported, given ``-t``) on first lookup.

    Names and membership need no import; ``[name]``/``get`` load that one command;
    ``items()``/``values()`` load them all.
    """

    def __init__(self, loaders: dict[str, Callable[[], click.Command]]) -> None:
        self._loaders = dict(loaders)
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded and name in self._loaders:
            self._loaded[name] = with_table(self._loaders.pop(name)())
        return self._loaded[name]

    def __setitem__(self, name: str, cmd: click.Command) -> None:
        self._loaders.pop(name, None)
        self._loaded[name] = cmd

    def __delitem__(self, name: str) -> None:
        if self._loaders.pop(name, None) is None:
            del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._loaded, *self._loaders}))

    def __len__(self) -> int:
        return len({*self._loaded, *self._loaders})


@click.group(
    cls=Group,
    commands=LazyCommands(COMMANDS),
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("-t", "--table", metavar="PATH", envvar="SMAPQ_TABLE", help=TABLE_HELP)
@click.version_option(__version__, prog_name="smapq")
@click.pass_context
def cli(ctx: click.Context, table: str | None) -> None:
    """smapq: the FWTK smap/smapd sendmail wrapper with a database as the spool."""
    ctx.obj = State(table)


def run(args: list[str] | None = None, prog: str = "smapq", command: click.Command = cli) -> int:
    """Run ``command`` (the smapq CLI) and return its exit code instead of raising."""
    try:
        rv = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return 1
    except click.ClickException as exc:
        click.echo(f"{prog}: {exc.format_message()}", err=True)
        return EX_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except SmapqError as exc:
        click.echo(f"{prog}: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        # Only a command that opened the queue imported SQLAlchemy; none raised its
        # DBAPIError otherwise.
        dbapi = sys.modules.get("sqlalchemy.exc")
        if dbapi is not None and isinstance(exc, dbapi.DBAPIError):
            reason = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
            click.echo(f"{prog}: queue database: {reason[0]}", err=True)
            return 1
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        return EX_SOFTWARE
    # In non-standalone mode click returns the code of ctx.exit(n) instead of raising.
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


def smapd_main() -> None:
    """``smapd``: the FWTK name for ``smapq deliver --daemon``."""
    from .deliver import smapd_cmd  # noqa: PLC0415

    sys.exit(run(prog="smapd", command=smapd_cmd))
