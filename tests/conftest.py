"""Shared fixtures: a netperm-table on disk, an initialised spool, the installed programs.

Tests run the installed console scripts (``smapq``, ``smap``, ``smapd``) from the venv
that runs pytest, as inetd or an operator would.

Both backends
-------------
A test that asks for the ``backend`` fixture -- directly, or through ``spool``,
``filled``, ``rig``, ``any_rig``, ``database`` or a module's
``pytestmark = pytest.mark.usefixtures("backend")`` -- runs once per backend, with ids
``test_x[sqlite]`` and ``test_x[postgresql]``, unless it is marked
``@pytest.mark.sqlite_only("why")``: then it is not parametrised and runs on SQLite.
On PostgreSQL every such test gets a fresh database of its own on the real server
(tests/pgdb.py), and the spool's table says ``smap, smapd: database
postgresql+psycopg://...``; on SQLite the spool's file is the database.
``make_spool`` without an explicit backend uses the running test's.

Which backends run: ``pytest --backend sqlite|postgresql|both`` (or
``SMAPQ_TEST_BACKEND``); the default is both, as in CI.  ``--backend postgresql``
runs the ``[postgresql]`` halves and the tests of PostgreSQL alone (marked
``postgres``, or on a ``pg_url`` or ``pg_queue`` database); ``--backend sqlite`` runs
everything else (the ``[sqlite]`` halves, the SQLite-only tests, and those that touch
no database), so the two runs together are exactly ``both``.

Assertions on the queue go through ``Spool.query`` / ``Spool.scalar`` /
``Spool.execute`` (SQLAlchemy ``text()`` with ``:named`` parameters), so the same
assertion runs on both backends; no test opens the queue with ``sqlite3`` unless it
is about the SQLite file.

SQLite-only tests (not parametrised, so never skipped: they run in every run that
includes SQLite; grep ``sqlite_only`` for the marked ones, each with its reason) --
they are about the SQLite file or SQLite's own machinery, which PostgreSQL does not have:
  - modes and owners of smapq.db and its -wal/-shm: test_cli_admin.py (init repairs
    modes, init as root), test_machine_checks.py (-wal/-shm, owners, files root makes),
    security/test_boundary.py's shared-group layout
  - a missing, damaged or impossible database file: test_no_database.py,
    deliver/test_damaged_db.py (random bytes in the file, db verify/recover, the
    .damaged note, a BLOB in a text column), test_once.py's missing file,
    test_serve_process.py's start-up errors, report "missing database" on SQLite
  - SQLite's write lock, busy handling, pragmas and change counter: store/test_store.py
    (pragmas, lock order), deliver/test_claim.py (data_version; PostgreSQL LISTENs),
    deliver/test_claim_plan.py (EXPLAIN QUERY PLAN)
  - a full tmpfs under the spool: deliver/test_full_spool.py, receive/test_receive_jail.py's
    disk-full test (SQLite's full-disk path and minfree on the spool's filesystem)
  - the lean receiver's stdlib SQLite intake and its rendered statements:
    receive/test_receive_queue.py, receive/test_receive_rendered.py (PostgreSQL's
    intake has its own: store/test_intake_postgresql.py, receive/test_pg_intake.py)
  - ``report sql``'s PRAGMA, ATTACH and VACUUM INTO (SQLite statements)
Not about the queue database at all (they run once, with the SQLite half): the SMTP
session, config, layout, man pages, the sandbox's syscall filter, the process-boundary
attacks of tests/security/test_boundary.py, bench/load.py's counting.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text

# pytest imports this file as 'conftest' (tests/ is not a package) while the kits and
# test modules import 'tests.conftest': without one module under both names they got a
# second copy whose _running was always empty, so their make_spool made SQLite spools
# in tests that pytest ran (and named) on PostgreSQL.
if __name__ == "conftest":
    sys.modules.setdefault("tests.conftest", sys.modules[__name__])
elif __name__ == "tests.conftest":
    sys.modules.setdefault("conftest", sys.modules[__name__])

BIN = Path(sys.executable).parent
BACKENDS = ("sqlite", "postgresql")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=(*BACKENDS, "both"),
        default=os.environ.get("SMAPQ_TEST_BACKEND", "both"),
        help="queue database the backend-parametrised tests run on (default: both)",
    )


def selected_backends(config: pytest.Config) -> tuple[str, ...]:
    choice = str(config.getoption("--backend"))
    return BACKENDS if choice == "both" else (choice,)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and not metafunc.definition.get_closest_marker(
        "sqlite_only"
    ):
        names = selected_backends(metafunc.config)
        metafunc.parametrize("backend", names, indirect=True, ids=names)


def needs_postgresql(item: pytest.Item) -> bool:
    """The ``[postgresql]`` half of a parametrised test, or a test of PostgreSQL alone
    (marked ``postgres``, or on a ``pg_url`` or ``pg_queue`` database)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "postgresql":
        return True
    names = getattr(item, "fixturenames", ())
    on_server = "pg_url" in names or "pg_queue" in names
    return item.get_closest_marker("postgres") is not None or on_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--backend sqlite`` runs everything that needs no PostgreSQL server;
    ``--backend postgresql`` runs only what does (the two make ``both``)."""
    chosen = selected_backends(config)
    if len(chosen) == len(BACKENDS):
        return
    keep, drop = [], []
    for item in items:
        (keep if needs_postgresql(item) == (chosen == ("postgresql",)) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def program(name: str) -> str:
    """Absolute path of an installed console script in this venv."""
    path = BIN / name
    assert path.exists(), f"{path} is not installed: pip install '.[test]'"
    return str(path)


def write_table(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class Backend:
    """The queue database a parametrised test runs on; its fresh databases."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stack = ExitStack()

    @property
    def postgresql(self) -> bool:
        return self.name == "postgresql"

    def database(self, migrated: bool = False) -> str | None:
        """A new database's URL on PostgreSQL (dropped after the test), empty or
        (``migrated``) holding the queue's tables; None on SQLite, where the spool's
        file is the database."""
        if not self.postgresql:
            return None
        from tests.pgdb import fresh_database

        return self._stack.enter_context(fresh_database(migrated))

    def close(self) -> None:
        self._stack.close()


_running: list[Backend] = []  # the running test's backend, for make_spool
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()  # every engine that connected


@event.listens_for(Engine, "engine_connect")
def _seen(conn: Connection) -> None:
    # Pooled PostgreSQL connections must be closed before the test's database is
    # dropped (and before the GC finds them open): whoever made the engine.
    _engines.add(conn.engine)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend this test runs on (parametrised: see the module docstring)."""
    b = Backend(str(getattr(request, "param", "sqlite")))  # sqlite_only: no param
    _running.append(b)
    try:
        yield b
    finally:
        _running.remove(b)
        for engine in list(_engines):
            engine.dispose()
        b.close()


class Spool:
    """A spool made by ``smapq init`` from a table of the test's choosing."""

    def __init__(self, root: Path, table: Path, database: str | None = None) -> None:
        self.root = root
        self.table = table
        self.directory = root / "spool"
        self.baddir = root / "bad"
        self.db = self.directory / "smapq.db"
        self.database = database  # the PostgreSQL URL; None: the SQLite file self.db
        self._engines: dict[bool, Engine] = {}

    @property
    def backend(self) -> str:
        return "postgresql" if self.database else "sqlite"

    @property
    def target(self) -> str:
        """What ``make_engine`` and ``database`` take: the URL, or the file's path."""
        return self.database or str(self.db)

    def engine(self, readonly: bool = False) -> Engine:
        """An engine on the queue (cached); read-only ones never take the write lock."""
        if readonly not in self._engines:
            from smapq.store.engine import make_engine

            self._engines[readonly] = make_engine(self.target, readonly=readonly)
        return self._engines[readonly]

    def query(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only statement (``:name`` parameters), as plain tuples."""
        with self.engine(readonly=True).connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine(readonly=True).connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def execute(self, sql: str, **params: Any) -> int:
        """Run a writing statement in its own transaction; the rows it touched."""
        with self.engine().begin() as conn:
            return int(conn.execute(text(sql), params).rowcount)

    def smapq(
        self, *args: str, check: bool = True, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [program("smapq"), "-t", str(self.table), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            **kw,  # type: ignore[call-overload]
        )


def make_spool(
    root: Path,
    extra: str = "",
    user: str | None = None,
    backend: Backend | None = None,
    *,
    cli_init: bool = False,
) -> Spool:
    """Write a table for a spool under ``root`` and initialise it as ``smapq init`` does.

    Without ``user`` the spool belongs to the invoking user and the receiver's jail is
    off (works unprivileged); with ``user`` (root only) smap and smapd run as that user
    and smap chroots.  The queue is on ``backend``, by default the running test's
    (SQLite for a test that is not parametrised by backend).

    The spool is made by the installed engine's ``smapq.spool.init`` in this process,
    from a queue database that already holds the tables (a copy of a migrated file or
    template database, see ``_init_spool``); a test about ``smapq init`` itself passes
    ``cli_init=True`` to run the installed ``smapq init`` on an empty database instead.
    """
    backend = backend or (_running[-1] if _running else None)
    database = backend.database(migrated=not cli_init) if backend is not None else None
    lines = [f"smap, smapd: directory {root / 'spool'}", f"smapd: baddir {root / 'bad'}"]
    if database:
        lines.append(f"smap, smapd: database {database}")
    if user:
        lines.append(f"smap, smapd: userid {user}")
    else:
        lines.append("smap: jail off")
    table = write_table(root / "netperm-table", "\n".join(lines) + "\n" + extra)
    spool = Spool(root, table, database)
    if cli_init:
        spool.smapq("init")
    else:
        _init_spool(table)
    return spool


def _init_spool(table: Path) -> None:
    """What ``smapq -t table init`` does, without a process start (~0.5 s of CPU, most of
    it importing) or migrations per spool: a SQLite queue file about to be created is
    copied from one migrated once per session (tests/spooldb.py) into the spool, then
    ``smapq.spool.init`` -- the engine under ``smapq init`` -- makes the directories and
    sets every owner and mode as it would, and finds the schema current."""
    from smapq import spool as engine_spool
    from smapq.config.settings import load
    from tests.spooldb import place_migrated_file

    config = load(str(table))
    engine_spool.check(engine_spool.plan(config))
    if not config.smap.database_is_url:
        place_migrated_file(config.smap.directory, config.smap.database_path)
    engine_spool.init(config)


@pytest.fixture
def spool(tmp_path: Path, backend: Backend) -> Spool:
    """An initialised spool owned by the test user, jail off, on each backend."""
    return make_spool(tmp_path, backend=backend)


@pytest.fixture
def database(tmp_path: Path, backend: Backend) -> str:
    """An empty queue database for the store's own tests: a new file on SQLite (made
    by ``make_engine(..., create=True)``), a fresh database on PostgreSQL."""
    return backend.database() or str(tmp_path / "q.db")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A world-traversable temp dir (0755) for files an unprivileged uid must reach.

    pytest's tmp_path lives under /tmp/pytest-of-root (0700), which a dropped uid cannot
    enter.
    """
    path = Path(tempfile.mkdtemp(prefix="smapq-test-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL server (SQLAlchemy URL)."""
    from tests.pgdb import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture
def pg_queue() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server holding the queue's empty tables
    (a copy of a template that ``smapq init`` migrated, see tests/pgdb.py)."""
    from tests.pgdb import fresh_database

    with fresh_database(migrated=True) as url:
        yield url
