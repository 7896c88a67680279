"""A private PostgreSQL server for tests that stop, start or break the server.

The shared server at 127.0.0.1:5432 (tests/pgdb.py) serves every test run on the
machine; a test that stops it would break the others.  ``PrivateServer`` makes a
throw-away cluster of its own with the Debian binaries (initdb + pg_ctl run as the
``postgres`` user, trust auth, a free loopback port, its Unix socket in its own
directory) and can stop (``fast`` or ``immediate``: a crash), start and restart it
while clients hold connections.  Usable as a context manager; ``destroy()`` stops it
and removes its directory.  Needs root (to run as ``postgres``) or to be run as
``postgres``; CI runs as root.

Also used by the scale benchmark (bench/), and the base of the many-hosts rig's server
(tests/scale/rig.py: ``listen`` on its bridge, ``hba`` for its subnet, its own
``directory``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.receive.superserver import free_port

PG_BIN = Path(os.environ.get("SMAPQ_PG_BIN", "/usr/lib/postgresql/15/bin"))
OWNER = "postgres"
START_TIMEOUT = 120  # seconds for pg_ctl -w (a loaded CI box is slow)


def available() -> bool:
    """True when the binaries and the postgres user exist and we may become it."""
    try:
        pwd.getpwnam(OWNER)
    except KeyError:
        return False
    return (PG_BIN / "initdb").exists() and (
        os.geteuid() == 0 or pwd.getpwuid(os.geteuid()).pw_name == OWNER
    )


def _as_owner(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OWNER)

        def drop() -> None:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)

        preexec = drop
    else:
        preexec = None
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=check,
        timeout=START_TIMEOUT + 30,
        preexec_fn=preexec,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
    )


class PrivateServer:
    """A PostgreSQL cluster of the test's own; see the module docstring."""

    def __init__(
        self,
        settings: dict[str, str] | None = None,
        *,
        listen: str = "127.0.0.1",
        directory: Path | None = None,
        hba: Sequence[str] = (),
    ) -> None:
        """``settings`` go to postgresql.conf; ``hba`` lines are added to pg_hba.conf;
        ``directory`` (made if missing) instead of a new temporary one."""
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="smapq-pg-"))
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self.dir = directory
        self.listen = listen
        self.data = self.dir / "data"
        self.sockets = self.dir / "run"
        self.log = self.dir / "server.log"
        owner = pwd.getpwnam(OWNER)
        for path in (self.dir, self.sockets):
            path.mkdir(exist_ok=True)
            os.chown(path, owner.pw_uid, owner.pw_gid)
        self.dir.chmod(0o755)
        self.port = free_port()
        initdb = [str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", OWNER]
        _as_owner([*initdb, "-E", "UTF8", "-N"])  # -N: no fsync of a throw-away cluster
        conf = {
            "listen_addresses": f"'{listen}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sockets}'",
            "fsync": "on",
            "shared_buffers": "16MB",
            "max_connections": "50",
            **(settings or {}),
        }
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{key} = {value}\n" for key, value in conf.items())
        with (self.data / "pg_hba.conf").open("a") as f:
            f.writelines(f"{line}\n" for line in hba)
        self.start()

    # --- URLs ---
    def libpq_url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{OWNER}@{self.listen}:{self.port}/{dbname}"

    def url(self, dbname: str = "postgres") -> str:
        """The SQLAlchemy URL (psycopg 3 driver), as ``smap: database`` takes it."""
        return f"postgresql+psycopg://{OWNER}@{self.listen}:{self.port}/{dbname}"

    def socket_url(self, dbname: str = "postgres") -> str:
        """The same database through the Unix socket."""
        return f"postgresql+psycopg://{OWNER}@/{dbname}?host={self.sockets}&port={self.port}"

    # --- control ---
    def _ctl(self, *args: str) -> None:
        _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args])

    def start(self) -> None:
        self._ctl("-w", "-t", str(START_TIMEOUT), "-l", str(self.log), "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients are disconnected (57P01); ``immediate``: a crash."""
        self._ctl("-w", "-t", str(START_TIMEOUT), "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def hba(self, *lines: str) -> None:
        """Put ``lines`` first in pg_hba.conf (first match wins) and reload."""
        path = self.data / "pg_hba.conf"
        path.write_text("".join(line + "\n" for line in lines) + path.read_text())
        self._ctl("reload")

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit)."""
        import psycopg

        with psycopg.connect(self.libpq_url(dbname), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def running(self) -> bool:
        proc = _as_owner([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"], check=False)
        return proc.returncode == 0

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.libpq_url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def destroy(self) -> None:
        if self.data.exists() and self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


def wait_accepting(server: PrivateServer, timeout: float = 60) -> None:
    """Until the server takes connections (pg_ctl -w said so; this double-checks)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(server.libpq_url(), connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the private server does not accept connections"
            time.sleep(0.05)
