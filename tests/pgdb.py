"""Fresh databases on the real PostgreSQL server the tests (and CI) run against.

The server is the one ``.ci/run`` starts: 127.0.0.1:5432, trust auth, user postgres
(override with SMAPQ_TEST_PG, a libpq conninfo URL to the maintenance database).  Every
caller gets a database of its own, named ``smapq_t_<pid>_<n>``, dropped when done, so
tests and parallel runs never share a queue.

A queue that only needs to exist (a spool's database, ``pg_queue``) is a fresh database
copied from a template (CREATE DATABASE ... TEMPLATE): ``smapq init`` migrates the
template once per pytest process instead of once per test.  The template is that
process's own (``smapq_tpl_<pid>_<digest of the installed migrations>``), made on first
use from the migrations installed now and dropped at exit, so a changed migration is
never served from an old copy and parallel runs never share or race for one.

A finished test's database is dropped on a thread of this process's own while the
next test runs: DROP DATABASE waits for a checkpoint of the whole server (a second or
more while other work writes to it), which no test needs to wait for.  The process
waits for every drop before it exits.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from tests.spooldb import migrations_digest, smapq_init

ADMIN = os.environ.get("SMAPQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_serial = itertools.count()


def sqlalchemy_url(libpq_url: str) -> str:
    """The same database as a SQLAlchemy URL with the psycopg 3 driver."""
    return "postgresql+psycopg://" + libpq_url.split("://", 1)[1]


def libpq_url(sqlalchemy_url: str) -> str:
    """The libpq URL (for psycopg) of a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return "postgresql://" + sqlalchemy_url.split("://", 1)[1]


def _url(name: str) -> str:
    return ADMIN.rsplit("/", 1)[0] + "/" + name


def create_database(template: str | None = None, name: str | None = None) -> str:
    """Create an empty database (a copy of ``template``, if given); its libpq URL."""
    name = name or f"smapq_t_{os.getpid()}_{next(_serial)}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(create)
    return _url(name)


def drop_database(libpq_url: str) -> None:
    name = libpq_url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


_templates: dict[str, str] = {}  # this process's template: digest -> database name


def migrated_template() -> str:
    """The name of this process's template database: the queue's tables at head."""
    digest = migrations_digest()
    if digest not in _templates:
        url = create_database(name=f"smapq_tpl_{os.getpid()}_{digest}")
        try:
            create_schema(sqlalchemy_url(url))
        except BaseException:
            drop_database(url)
            raise
        _templates[digest] = url.rsplit("/", 1)[1]
        atexit.register(_drop_if_mine, url, os.getpid())
    return _templates[digest]


class _Dropper:
    """Drops databases in the order given, on a daemon thread; ``wait`` for them all."""

    def __init__(self) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def put(self, libpq_url: str) -> None:
        with self._lock:
            if self._thread is None or self._pid != os.getpid():
                self._thread = threading.Thread(target=self._run, name="pgdb-drop", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
                atexit.register(self.wait)
        self._queue.put(libpq_url)

    def _run(self) -> None:
        while True:
            url = self._queue.get()
            try:
                drop_database(url)
            except Exception as exc:  # a leftover database, not a test's failure
                print(f"tests/pgdb.py: could not drop {url}: {exc}", file=sys.stderr)
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        if self._pid == os.getpid():
            self._queue.join()


_dropper = _Dropper()


def _drop_if_mine(libpq_url: str, pid: int) -> None:
    if os.getpid() == pid:  # not in a forked child that inherited the exit hook
        drop_database(libpq_url)


@contextmanager
def fresh_database(migrated: bool = False) -> Iterator[str]:
    """A new database for the block, empty or (``migrated``) holding the queue's tables
    as ``smapq init`` makes them; yields its SQLAlchemy URL."""
    url = create_database(migrated_template() if migrated else None)
    try:
        yield sqlalchemy_url(url)
    finally:
        _dropper.put(url)


def create_schema(url: str) -> None:
    """The queue's tables on ``url`` (SQLAlchemy URL), made by the installed ``smapq
    init`` from a throw-away table, as an operator makes them."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        smapq_init(tmp, f"smap, smapd: database {url}\n")
