"""``smapq serve``: the long-lived, jailed SMTP listener (smapq.serve)."""

from __future__ import annotations

import click

from .common import State, pass_state


@click.command("serve")
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="ADDR:PORT",
    help="address to listen on, repeatable: 0.0.0.0:25, [::]:25, 127.0.0.1:2525; "
    "none: the sockets of systemd socket activation (Accept=no)",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="serving processes (each jailed); more for hosts with more cores",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="seconds sessions may finish after SIGTERM, before 421 4.3.2",
)
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="event loop: uvloop when installed (auto), or the standard library's",
)
@pass_state
def serve_cmd(state: State, listen: tuple[str, ...], workers: int, grace: float, loop: str) -> int:
    """Listen for SMTP and queue each message, like smap under inetd but long-lived.

    Run as root: the sockets are bound as root, then every worker reads the table,
    chroots into the spool, drops to smap's uid and serves many sessions at once.
    SIGTERM stops accepting and lets sessions finish; SIGHUP re-reads the table.
    """
    from smapq.serve.main import run  # noqa: PLC0415  (asyncio only for this command)

    return run(state.table, list(listen), workers, grace, loop)
