"""``smapq serve`` and ``smap -daemon``: check the set-up, bind, hand over to the supervisor.

Purpose: the entry point both spellings share.  Everything that can be checked before
a socket is bound is checked here, so a mistake is one line on stderr and an exit
code, not a worker that dies and is replaced forever: the table (78), the queue
database's existence (75; a PostgreSQL database: one connection is made and closed),
the listen addresses (64/71).

Usage: ``smapq [-t TABLE] serve [--listen ADDR:PORT]... [--workers N] [--grace S]
[--loop auto|asyncio|uvloop]``; ``smap -daemon`` takes the same options (and ``-t``)
and listens on port 25 of every address when given no ``--listen``, as FWTK 2.1's
``smap -daemon`` did.
"""

from __future__ import annotations

import os
import sys

from smapq.config.netperm import table_path
from smapq.config.settings import load
from smapq.errors import EX_USAGE, SmapqError, TempError, UsageError
from smapq.receive import jail
from smapq.serve import listeners
from smapq.serve.supervisor import Supervisor
from smapq.store import intake_open

LOOPS = ("auto", "asyncio", "uvloop")
MAX_WORKERS = 16


def run(
    table: str | None,
    listen: list[str],
    workers: int = 1,
    grace: float = 30.0,
    loop: str = "auto",
) -> int:
    """Serve until SIGTERM; raises SmapqError for anything wrong before the start."""
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 1..{MAX_WORKERS}")
    if grace < 0:
        raise UsageError("--grace must not be negative")
    if loop not in LOOPS:
        raise UsageError(f"--loop must be one of {', '.join(LOOPS)}")
    path = table_path(table)
    smap = load(path).smap
    if smap.database_is_url:
        intake_open.check_server(smap)  # StoreError is a TempError: one line, exit 75
    elif not os.path.exists(smap.database_path):
        raise TempError(f"no queue database at {smap.database_path}: run 'smapq init' first")
    jail.preflight(smap.jail, smap.userid)
    sockets = listeners.open_all(listen)
    return Supervisor(path, sockets, workers, grace, loop).run()


DAEMON_USAGE = (
    "usage: smap -daemon [-t TABLE] [--listen ADDR:PORT]... [--workers N] [--grace S]"
    " [--loop auto|asyncio|uvloop]\n"
)


def run_daemon(argv: list[str], prog: str = "smap -daemon") -> int:
    """``smap -daemon``: the same as ``smapq serve``, port 25 by default."""
    table: str | None = None
    listen: list[str] = []
    workers, grace, loop = 1, 30.0, "auto"
    args = list(argv)
    try:
        while args:
            arg = args.pop(0)
            if arg in ("-h", "--help"):
                sys.stdout.write(DAEMON_USAGE)
                return 0
            if arg not in ("-t", "--table", "--listen", "--workers", "--grace", "--loop"):
                raise UsageError(f"unknown argument {arg!r}")
            if not args:
                raise UsageError(f"{arg} needs a value")
            value = args.pop(0)
            if arg in ("-t", "--table"):
                table = value
            elif arg == "--listen":
                listen.append(value)
            elif arg == "--workers":
                workers = int(value)
            elif arg == "--grace":
                grace = float(value)
            else:
                loop = value
        return run(table, listen or ["0.0.0.0:25", "[::]:25"], workers, grace, loop)
    except ValueError as exc:
        sys.stderr.write(f"{prog}: {exc}\n{DAEMON_USAGE}")
        return EX_USAGE
    except SmapqError as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return exc.exit_code
