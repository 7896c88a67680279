"""Which intake backend a ``smap: database`` value means, and when to open it.

Purpose: the one place that picks the backend from the configured database: a file
name is the SQLite backend (smapq.store.intake_sqlite), a URL naming PostgreSQL
(``postgresql+psycopg://...``) the PostgreSQL backend (smapq.store.intake_postgresql).
Both transports open their store in two steps around the jail:

  ``before_jail(smap)``  as root, before chroot: a server database is connected to
      now (the chroot hides its Unix socket, /etc and libpq's files); for a file,
      None.  psycopg is imported only here and only for a PostgreSQL URL, so the
      SQLite receiver's start-up cost is unchanged.
  ``in_jail(smap, store)``  after the jail: the store from before, or the SQLite file
      opened by its path inside the jail.

``check_server(smap)`` is ``smapq serve``'s start-up check: connect once and close.

Security: with the jail on, a Unix-socket connection is refused (``host=/run/postgresql``,
or no host in the URL, the service file or ``PGHOST``): the socket is outside the
chroot, so a reconnect after a server restart could never work.  Use
``host=127.0.0.1`` (or another address) instead.  The check reads the parameters the
first connection pinned (smapq.store.intake_postgresql), so a host that only the
service file names counts.

Diagnostics: ``StoreError`` with a 421 reply and a one-line reason.

Lean: stdlib only at import (the receiver imports this module on every connection).
"""

from __future__ import annotations

from smapq.intake.port import StoreError
from smapq.smtp import replies as R
from smapq.store.intake_sqlite import SqliteIntake

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from smapq.intake.port import IntakeStore

    class SmapSettings(Protocol):
        """What is read of smap's settings (smapq.config.settings.SmapSettings)."""

        database: str
        jail: bool

        @property
        def database_is_url(self) -> bool: ...
        @property
        def database_in_jail(self) -> str: ...


SERVER_SCHEMES = ("postgresql", "postgres")


def is_server(database: str) -> bool:
    """True when ``database`` is a URL naming a database server (PostgreSQL)."""
    scheme, sep, _ = database.partition("://")
    return bool(sep) and scheme.split("+")[0] in SERVER_SCHEMES


def _server(smap: SmapSettings, **kw: Any) -> IntakeStore:
    database = smap.database
    if not is_server(database):
        raise StoreError(
            f"smap cannot queue into {database.split('://')[0]}:// URLs"
            " (a file name, or postgresql+psycopg://...)",
            R.R421_UNAVAILABLE,
        )
    from smapq.store import intake_postgresql as pg  # noqa: PLC0415  (PostgreSQL only)

    store = pg.PostgresIntake(database, **kw)
    if smap.jail and pg.is_socket_path(store.params):
        store.close()
        raise StoreError(
            "a Unix-socket database URL cannot be reached from the jail: give "
            "host=127.0.0.1 (or another address) in 'smap: database', or 'smap: jail off'",
            R.R421_UNAVAILABLE,
        )
    return store


def before_jail(smap: SmapSettings) -> IntakeStore | None:
    """Connect to a server database now; None for a file (opened by ``in_jail``)."""
    return _server(smap) if smap.database_is_url else None


def in_jail(smap: SmapSettings, store: IntakeStore | None, **sqlite: Any) -> IntakeStore:
    """The store from ``before_jail``, or the SQLite file (``sqlite``: its options)."""
    if store is not None:
        return store
    return SqliteIntake(smap.database_in_jail, **sqlite)


def check_server(smap: SmapSettings) -> None:
    """Connect to a server database and close again; raises StoreError."""
    _server(smap).close()
