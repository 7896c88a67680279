"""``smapq deliver --once | --daemon`` and ``smapd``, the deliverer's FWTK name.

``smapd`` is its own command (``smapd [-d] [-t PATH]``, always the daemon) so that its
help and usage lines name ``smapd``, not ``smapq deliver``.
"""

from __future__ import annotations

import click

from smapq import __version__
from smapq.config.netperm import table_path
from smapq.deliver import service

from .common import TABLE_HELP, State, pass_state


@click.command("deliver")
@click.option("--once", is_flag=True, help="Deliver everything due, then exit (for cron).")
@click.option("--daemon", is_flag=True, help="Keep delivering until SIGTERM/SIGINT (smapd).")
@click.option("-d", "--debug", is_flag=True, help="Log debug detail to stderr (FWTK smapd -d).")
@pass_state
@click.pass_context
def deliver_cmd(ctx: click.Context, state: State, once: bool, daemon: bool, debug: bool) -> None:
    """Hand queued messages to sendmail and record each outcome.

    Exit status of --once: 0 all delivered, 75 something deferred, 1 something bad.
    """
    if once == daemon:
        raise click.UsageError(
            "--once and --daemon exclude each other" if once else "say --once or --daemon"
        )
    ctx.exit(service.run(state.table, once=once, debug=debug))


@click.command("smapd", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-d", "--debug", is_flag=True, help="Log debug detail to stderr (FWTK smapd -d).")
@click.option("-t", "--table", metavar="PATH", envvar="SMAPQ_TABLE", help=TABLE_HELP)
@click.version_option(__version__, prog_name="smapd")
@click.pass_context
def smapd_cmd(ctx: click.Context, debug: bool, table: str | None) -> None:
    """The deliverer as a daemon: hand queued mail to sendmail until SIGTERM or SIGINT.

    The FWTK name of 'smapq deliver --daemon'. It reads the smapd lines of the
    netperm-table, drops to 'smapd: userid' and delivers through 'smapd: sendmail';
    SIGHUP re-reads the table. For a single pass from cron use 'smapq deliver --once'.
    """
    ctx.exit(service.run(table_path(table), once=False, debug=debug))
