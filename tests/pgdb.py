"""Fresh databases on the real PostgreSQL server the tests (and CI) run against.

The server is the one ``.ci/run`` starts: 127.0.0.1:5432, trust auth, user postgres
(override with SMAPQ_TEST_PG, a libpq conninfo URL to the maintenance database).  Every
caller gets a database of its own, named ``smapq_t_<pid>_<n>``, dropped when done, so
tests and parallel runs never share a queue.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

ADMIN = os.environ.get("SMAPQ_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_serial = itertools.count()


def sqlalchemy_url(libpq_url: str) -> str:
    """The same database as a SQLAlchemy URL with the psycopg 3 driver."""
    return "postgresql+psycopg://" + libpq_url.split("://", 1)[1]


def create_database() -> str:
    """Create an empty database; return its libpq URL."""
    name = f"smapq_t_{os.getpid()}_{next(_serial)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return ADMIN.rsplit("/", 1)[0] + "/" + name


def drop_database(libpq_url: str) -> None:
    name = libpq_url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new empty database for the block; yields its SQLAlchemy URL."""
    url = create_database()
    try:
        yield sqlalchemy_url(url)
    finally:
        drop_database(url)


def create_schema(url: str) -> None:
    """The queue's tables on ``url`` (SQLAlchemy URL), made by the installed ``smapq
    init`` from a throw-away table, as an operator makes them."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "netperm-table"
        table.write_text(f"smap, smapd: directory {tmp}/spool\nsmap, smapd: database {url}\n")
        table.chmod(0o600)
        done = subprocess.run(
            [str(Path(sys.executable).parent / "smapq"), "-t", str(table), "init"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
