"""Issue 11 item 2 and finding 4 of the hardening review: a command run on a spool
without its database says so in one line, exits non-zero and creates nothing -- no
empty database owned by whoever ran it (as root, a root-owned 0644 file every
receiver then failed on)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import Spool, make_spool, program

COMMANDS = [
    ["db", "current"],
    ["db", "check"],
    ["db", "upgrade"],
    ["db", "downgrade", "base"],
    ["report", "summary"],
    ["queue", "list"],
    ["queue", "requeue", "01ARZ3NDEKTSV4RRFFQ69G5FAV"],
    ["queue", "purge", "--older-than", "1d"],
    ["deliver", "--once"],
]


@pytest.fixture
def no_db(tmp_path: Path) -> Spool:
    spool = make_spool(tmp_path)
    spool.db.unlink()
    return spool


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_missing_database_is_one_line_and_nothing_is_created(
    no_db: Spool, args: list[str]
) -> None:
    proc = subprocess.run(
        [program("smapq"), "-t", str(no_db.table), *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode not in (0, 70), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not exist" in lines[0] and "smapq init" in lines[0], lines[0]
    assert sorted(p.name for p in no_db.directory.iterdir()) == []


def test_import_spool_without_database_creates_nothing(no_db: Spool, tmp_path: Path) -> None:
    old = tmp_path / "old-spool"
    old.mkdir()
    (old / "smaAAAAAA").write_text("FROM <a@b.example>\nRCPT <c@d.example>\nBODY\nhi\n")
    proc = no_db.smapq("import-spool", str(old), check=False)
    assert proc.returncode not in (0, 70) and "does not exist" in proc.stderr, proc.stderr
    assert list(no_db.directory.iterdir()) == []


def test_damaged_database_is_one_line(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    spool.db.write_bytes(b"this is not an SQLite database" * 200)
    for args in (["db", "current"], ["db", "check"], ["report", "summary"]):
        proc = spool.smapq(*args, check=False)
        assert proc.returncode not in (0, 70), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "not a database" in proc.stderr
