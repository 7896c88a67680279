"""Shared fixtures: a netperm-table on disk, an initialised spool, the installed programs.

Tests run the installed console scripts (``smapq``, ``smap``, ``smapd``) from the venv
that runs pytest, as inetd or an operator would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def program(name: str) -> str:
    """Absolute path of an installed console script in this venv."""
    path = BIN / name
    assert path.exists(), f"{path} is not installed: pip install '.[test]'"
    return str(path)


def write_table(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class Spool:
    """A spool made by ``smapq init`` from a table of the test's choosing."""

    def __init__(self, root: Path, table: Path) -> None:
        self.root = root
        self.table = table
        self.directory = root / "spool"
        self.baddir = root / "bad"
        self.db = self.directory / "smapq.db"

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


def make_spool(root: Path, extra: str = "", user: str | None = None) -> Spool:
    """Write a table for a spool under ``root`` and run ``smapq init`` on it.

    Without ``user`` the spool belongs to the invoking user and the receiver's jail is
    off (works unprivileged); with ``user`` (root only) smap and smapd run as that user
    and smap chroots.
    """
    lines = [f"smap, smapd: directory {root / 'spool'}", f"smapd: baddir {root / 'bad'}"]
    if user:
        lines.append(f"smap, smapd: userid {user}")
    else:
        lines.append("smap: jail off")
    table = write_table(root / "netperm-table", "\n".join(lines) + "\n" + extra)
    spool = Spool(root, table)
    spool.smapq("init")
    return spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """An initialised spool owned by the test user, jail off."""
    return make_spool(tmp_path)


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
def pg_queue(pg_url: str) -> str:
    """A fresh database on the real PostgreSQL server holding the queue's empty tables."""
    from tests.pgdb import create_schema

    create_schema(pg_url)
    return pg_url
