"""``smapq deliver --once | --daemon``: the deliverer (``smapd`` is ``deliver --daemon``)."""

from __future__ import annotations

import click

from smapq.deliver import service

from .common import State, pass_state


@click.command("deliver")
@click.option("--once", "mode", flag_value="once", help="Deliver everything due, then exit.")
@click.option(
    "--daemon", "mode", flag_value="daemon", help="Keep delivering until SIGTERM/SIGINT."
)
@click.option("-d", "--debug", is_flag=True, help="Log debug detail to stderr (FWTK smapd -d).")
@click.option(
    "-t",
    "--table",
    metavar="PATH",
    help="netperm-table (as 'smapq -t'; lets 'smapd -t PATH' work)",
)
@pass_state
@click.pass_context
def deliver_cmd(
    ctx: click.Context, state: State, mode: str | None, debug: bool, table: str | None
) -> None:
    """Hand queued messages to sendmail and record each outcome.

    Exit status of --once: 0 all delivered, 75 something deferred, 1 something bad.
    """
    if mode is None:
        raise click.UsageError("say --once or --daemon")
    ctx.exit(service.run(table or state.table, once=mode == "once", debug=debug))
