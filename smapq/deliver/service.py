"""Start the deliverer: pre-drop initialisation, privilege drop, run, exit status.

Purpose: the seam between the CLI and the loop, like Postfix's pre_jail_init /
post_jail_init. Before the drop (still root when started by init): read the table,
open the logs, import everything the loop will need. After it: open the queue
database as smapd's user, build the change detector, run.

Exit status of ``--once``: 0 when everything due was delivered (or nothing was due),
75 (EX_TEMPFAIL) when something was deferred or lost its lease, or the queue database
kept failing (full, busy); 74 (EX_IOERR) when rows could not be read (a damaged
database: ``smapq db verify``); 1 when something went bad. ``--daemon`` returns 0
after SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal

from smapq import sandbox
from smapq.config.netperm import check_mode
from smapq.config.settings import SmapdSettings, load, loads
from smapq.deliver import deliverer, log, privilege, waker
from smapq.errors import EX_IOERR, EX_OK, EX_TEMPFAIL, ConfigError, SmapqError
from smapq.store.engine import make_engine


def database_of(settings: SmapdSettings) -> str:
    return settings.database if settings.database_is_url else settings.database_path


class Table:
    """The netperm-table, re-readable on SIGHUP even after the privilege drop.

    The table is root's, mode 0600, so smapd's user cannot open it again. A descriptor
    opened before the drop still reads it: edits made in place are seen. An editor
    that replaces the file (new inode) leaves the descriptor on the old one; that is
    detected (no links left) and reported instead of silently reloading stale text.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self.fd = None

    def load(self) -> SmapdSettings:
        try:
            return load(self.path).smapd
        except ConfigError as exc:
            if exc.reason != "permission denied" or self.fd is None:
                raise
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            raise ConfigError(
                "was replaced and smapd's user cannot open the new file: restart smapd",
                self.path,
            )
        check_mode(self.path, st)
        text = os.pread(self.fd, st.st_size, 0).decode("utf-8")
        return loads(text, self.path).smapd

    def reload(self, current: SmapdSettings, log: logging.Logger) -> SmapdSettings:
        """SIGHUP: the table again, or ``current`` (and why) if it cannot be read now."""
        try:
            fresh = self.load()
        except Exception as exc:
            log.error("SIGHUP: table not re-read, keeping the current settings: %s", exc)
            return current
        for name in ("userid", "groupid", "database", "directory"):
            if getattr(fresh, name) != getattr(current, name):
                log.warning("SIGHUP: %s changed; it takes effect at restart", name)
        log.info("SIGHUP: table re-read")
        return fresh

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def run(table: str, once: bool, debug: bool = False) -> int:
    """``smapq deliver --once`` (once=True) or ``--daemon``; returns the exit status."""
    # Until the loop's handlers are in place a SIGHUP would kill us (its default
    # action) and a SIGTERM would skip the orderly release: hold them pending; the
    # loop unblocks them once it can act on them (deliverer.Deliverer.run).
    signal.pthread_sigmask(signal.SIG_BLOCK, deliverer.HANDLED)
    source = Table(table)
    settings = source.load()
    logger = log.setup(debug)
    database = database_of(settings)
    if not settings.database_is_url and not os.path.exists(database):
        raise SmapqError(f"queue database {database} does not exist: run 'smapq init'")
    engine = make_engine(database)  # loads the dialect now; connects only after the drop
    logger.info(privilege.drop(settings.userid, settings.groupid))
    # The drop made us non-dumpable; a supervisor that starts us as the user did not.
    sandbox.nondumpable()
    # --once drains what is due and stops: it needs no change detection.
    change = waker.PollWaker() if once else waker.for_database(database)
    loop = deliverer.Deliverer(
        settings,
        engine,
        change,
        logger,
        once=once,
        reload=lambda current: source.reload(current, logger),
        database=database,
    )
    mode = "once" if once else f"daemon, wakeup {settings.wakeup}s"
    logger.debug("%s: delivering from %s (%s)", loop.owner, database, mode)
    try:
        tally = loop.run()
    except deliverer.Stopped as exc:
        text = f"deliver --once: stopped: {exc}; {_counts(loop.tally)}"
        raise Incomplete(text, exc.exit_code) from None
    finally:
        change.close()
        engine.dispose()
        source.close()
    logger.log(20 if once or debug else 10, "done: %s", tally)
    if once and tally.unreadable:
        raise Incomplete(
            f"deliver --once: {tally.unreadable} message(s) could not be read from the "
            f"damaged queue database: run 'smapq db verify'; {_counts(tally)}",
            EX_IOERR,
        )
    if once and (tally.bad or tally.deferred or tally.lost):
        raise Incomplete(f"deliver --once: {_counts(tally)}", 1 if tally.bad else EX_TEMPFAIL)
    return EX_OK


def _counts(tally: deliverer.Tally) -> str:
    return (
        f"{tally.bad} bad, {tally.deferred} deferred, {tally.lost} lost their lease, "
        f"{tally.delivered} delivered"
    )


class Incomplete(SmapqError):
    """``--once`` left something undelivered; the message and exit status say what."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
