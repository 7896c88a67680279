"""What every command shares: the table option, loading settings, opening the queue."""

from __future__ import annotations

import os
from typing import Any

import click
from sqlalchemy import Engine

from smapq.config.netperm import table_path
from smapq.config.settings import Config, load
from smapq.errors import EX_IOERR, SmapqError, UsageError
from smapq.store import damage, verify
from smapq.store.engine import make_engine


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
        smap = self.config.smap
        if smap.database_is_url:
            return make_engine(smap.database, readonly=readonly)
        path = smap.database_path
        if not os.path.exists(path):
            raise SmapqError(f"queue database {path} does not exist: run 'smapq init'")
        return make_engine(path, readonly=readonly)


pass_state = click.make_pass_decorator(State)


def echo_lines(lines: list[str], **kwargs: Any) -> None:
    for line in lines:
        click.echo(line, **kwargs)
