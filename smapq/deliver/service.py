"""Start the deliverer: pre-drop initialisation, privilege drop, run, exit status.

Purpose: the seam between the CLI and the loop, like Postfix's pre_jail_init /
post_jail_init. Before the drop (still root when started by init): read the table,
open the logs, import everything the loop will need. After it: open the queue
database as smapd's user, build the change detector, run.

Exit status of ``--once``: 0 when everything due was delivered (or nothing was due),
75 (EX_TEMPFAIL) when something was deferred or lost its lease, 1 when something went
bad. ``--daemon`` returns 0 after SIGTERM/SIGINT.
"""

from __future__ import annotations

from smapq.config.settings import SmapdSettings, load
from smapq.deliver import deliverer, log, privilege, waker
from smapq.errors import EX_OK, EX_TEMPFAIL, SmapqError
from smapq.store.engine import make_engine


def database_of(settings: SmapdSettings) -> str:
    return settings.database if settings.database_is_url else settings.database_path


def run(table: str, once: bool, debug: bool = False) -> int:
    """``smapq deliver --once`` (once=True) or ``--daemon``; returns the exit status."""
    settings = load(table).smapd
    logger = log.setup(debug)
    logger.info(privilege.drop(settings.userid, settings.groupid))
    database = database_of(settings)
    engine = make_engine(database)
    # --once drains what is due and stops: it needs no change detection.
    change = waker.PollWaker() if once else waker.for_database(database)
    loop = deliverer.Deliverer(
        settings, engine, change, logger, once=once, reload=lambda: load(table).smapd
    )
    mode = "once" if once else f"daemon, wakeup {settings.wakeup}s"
    logger.debug("%s: delivering from %s (%s)", loop.owner, database, mode)
    try:
        tally = loop.run()
    finally:
        change.close()
        engine.dispose()
    logger.log(20 if once or debug else 10, "done: %s", tally)
    if once and (tally.bad or tally.deferred or tally.lost):
        raise Incomplete(
            f"deliver --once: {tally.bad} bad, {tally.deferred} deferred, "
            f"{tally.lost} lost their lease, {tally.delivered} delivered",
            1 if tally.bad else EX_TEMPFAIL,
        )
    return EX_OK


class Incomplete(SmapqError):
    """``--once`` left something undelivered; the message and exit status say what."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
