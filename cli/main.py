"""``smapq``: the command line. Parses options, calls the engine, reports errors in one line.

Every ``SmapqError`` becomes ``smapq: <message>`` on stderr and the error's exit code
(78 for a bad netperm-table); a click usage error becomes one line and exit 64; a
database error no command translated itself (a damaged or unreadable queue database)
becomes ``smapq: queue database: <reason>`` and exit 1. Bugs are not swallowed:
anything else is a traceback and exit 70.
"""

from __future__ import annotations

import sys

import click
from sqlalchemy.exc import DBAPIError

from smapq import __version__
from smapq.errors import EX_SOFTWARE, EX_USAGE, SmapqError

from .admin import check_config_cmd, db_group, init_cmd
from .common import TABLE_HELP, Group, State
from .dbops import db_copy, db_grant
from .deliver import deliver_cmd, smapd_cmd
from .importspool import import_spool_cmd
from .queue import queue_group
from .receive import receive_cmd
from .report import report_group
from .serve import serve_cmd


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-t", "--table", metavar="PATH", envvar="SMAPQ_TABLE", help=TABLE_HELP)
@click.version_option(__version__, prog_name="smapq")
@click.pass_context
def cli(ctx: click.Context, table: str | None) -> None:
    """smapq: the FWTK smap/smapd sendmail wrapper with a database as the spool."""
    ctx.obj = State(table)


cli.add_command(init_cmd)
cli.add_command(check_config_cmd)
db_group.add_command(db_grant)
db_group.add_command(db_copy)
cli.add_command(db_group)
cli.add_command(receive_cmd)
cli.add_command(serve_cmd)
cli.add_command(deliver_cmd)
cli.add_command(report_group)
cli.add_command(queue_group)
cli.add_command(import_spool_cmd)


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
    except DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines() or [type(exc.orig).__name__]
        click.echo(f"{prog}: queue database: {reason[0]}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception:
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        return EX_SOFTWARE
    # In non-standalone mode click returns the code of ctx.exit(n) instead of raising.
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


def smapd_main() -> None:
    """``smapd``: the FWTK name for ``smapq deliver --daemon``."""
    sys.exit(run(prog="smapd", command=smapd_cmd))
