"""``smapq receive``: the receiver under its long name (inetd lines usually say ``smap``)."""

from __future__ import annotations

import sys

import click

from .common import State, pass_state


@click.command("receive")
@pass_state
def receive_cmd(state: State) -> None:
    """Speak SMTP on fd 0/1 as inetd's child and queue each message (same as smap).

    Prefer the ``smap`` program in inetd.conf: it starts in a fraction of the time,
    since it loads neither click nor SQLAlchemy.
    """
    from smapq.receive.main import run  # noqa: PLC0415

    sys.exit(run(["-t", state.table]))
