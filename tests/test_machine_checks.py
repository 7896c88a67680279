"""Finding 4 of the hardening review: wrong owners and modes went unnoticed.

Reported: after ``chmod 0400`` and back to 0600 of the database, its -wal/-shm files
stayed 0400 and every message got 451 while ``check-config`` and ``db check`` said all
was well; ``db upgrade`` as root before ``init`` made a root-owned 0644 database with
the same effect. Here with the real receiver (jailed, as nobody) and the installed
commands run as root: the fault is made, seen (451), found by ``check-config`` (one
line per problem, exit 1), repaired by ``init``, and mail flows again. Every command
run as root leaves every queue file with the queue's owner.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Backend, Spool, make_spool, open_dir, program, root_only
from tests.receive.conftest import Rig
from tests.receive.superserver import SuperServer

__all__ = ["open_dir"]

pytestmark = [root_only, pytest.mark.privileged, pytest.mark.integration]

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def rig(open_dir: Path, backend: Backend) -> Iterator[Rig]:
    sendmail = shutil.which("true") or "/bin/true"
    spool = make_spool(open_dir, f"smapd: sendmail {sendmail}\n", user="nobody", backend=backend)
    server = SuperServer("inetd", [program("smap"), "-t", str(spool.table)], open_dir)
    rig = Rig(spool, server)
    try:
        yield rig
    finally:
        for c in rig.clients:
            c.close()
        server.stop()


def send(rig: Rig) -> bytes:
    c = rig.client()
    for line in (b"HELO c.example", b"MAIL FROM:<a@c.example>", b"RCPT TO:<b@x.example>"):
        assert c.cmd(line).startswith(b"250"), line
    assert c.cmd(b"DATA").startswith(b"354")
    reply = c.cmd(b"Subject: t\r\n\r\nhi\r\n.")
    c.cmd(b"QUIT")
    rig.idle()
    return reply


def check(spool: Spool) -> tuple[int, list[str]]:
    proc = spool.smapq("check-config", check=False)
    assert "Traceback" not in proc.stderr
    return proc.returncode, [
        line for line in proc.stderr.splitlines() if line.startswith("smapq: problem: ")
    ]


def test_a_sound_spool_passes(rig: Rig) -> None:
    code, problems = check(rig.spool)
    assert (code, problems) == (0, [])


@pytest.mark.sqlite_only("the SQLite file and its -wal/-shm")
def test_wal_and_shm_left_read_only_are_found_and_repaired(rig: Rig) -> None:
    spool = rig.spool
    assert send(rig).startswith(b"250 ")
    db = spool.db
    db.chmod(0o400)
    # Any reader now makes -wal/-shm with the database's mode (SQLite copies it).
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    spool.smapq("report", "summary")
    db.chmod(0o600)
    assert Path(f"{db}-shm").stat().st_mode & 0o777 == 0o400
    assert send(rig).startswith(b"451 "), "the reported fault did not reproduce"
    code, problems = check(spool)
    assert code == 1
    assert any(f"{db}-shm: smap (uid {NOBODY.pw_uid}" in p for p in problems), problems
    assert spool.smapq("init").returncode == 0  # repairs the modes
    assert check(spool) == (0, [])
    assert send(rig).startswith(b"250 ")


@pytest.mark.sqlite_only("the owner of the SQLite file is one of the problems")
def test_every_problem_is_one_line(rig: Rig, open_dir: Path) -> None:
    spool = rig.spool
    os.chown(spool.db, 0, 0)
    spool.baddir.chmod(0o500)
    sendmail = shutil.which("true") or "/bin/true"
    table = spool.table.read_text().replace(sendmail, f"{open_dir}/gone")
    spool.table.write_text(table + "smap: minfree 1000g\n")
    code, problems = check(spool)
    assert code == 1
    text = "\n".join(problems)
    assert f"{spool.db}: owned by 0:0, should be {NOBODY.pw_uid}:{NOBODY.pw_gid}" in text
    assert f"{spool.db}: smap (uid {NOBODY.pw_uid}" in text
    assert f"{spool.baddir}: smapd (uid {NOBODY.pw_uid}" in text and "cannot write" in text
    assert f"{open_dir}/gone: sendmail does not exist" in text
    assert "below the reserve" in text


def test_schema_behind_is_a_problem(rig: Rig) -> None:
    spool = rig.spool
    spool.smapq("db", "downgrade", "base")
    code, problems = check(spool)
    assert code == 1
    assert any("schema is at nothing" in p and "db upgrade" in p for p in problems), problems


@pytest.mark.sqlite_only("the .damaged note of an SQLite file")
def test_damage_note_is_a_problem_and_reports_refuse(rig: Rig) -> None:
    spool = rig.spool
    Path(f"{spool.db}.damaged").write_text(
        "2025-01-01 smapd[1]: database disk image is malformed\n"
    )
    code, problems = check(spool)
    assert code == 1 and any("found damaged" in p for p in problems), problems
    proc = spool.smapq("report", "summary", check=False)
    assert proc.returncode != 0 and "damaged" in proc.stderr and proc.stdout == ""
    assert spool.smapq("db", "verify").returncode == 0  # sound after all: note removed
    assert spool.smapq("report", "summary").returncode == 0


@pytest.mark.sqlite_only("the SQLite files root's commands create")
def test_commands_run_as_root_leave_every_queue_file_to_the_queue_owner(rig: Rig) -> None:
    spool = rig.spool
    assert send(rig).startswith(b"250 ")
    for suffix in ("-wal", "-shm"):
        Path(f"{spool.db}{suffix}").unlink(missing_ok=True)
    [qid] = [
        line.split(",")[0]
        for line in spool.smapq("queue", "list", "--format", "csv").stdout.splitlines()[1:]
    ]
    for args in (
        ["report", "summary"],
        ["queue", "list"],
        ["queue", "hold", qid],
        ["queue", "release", qid],
        ["db", "check"],
        ["db", "upgrade"],
        ["db", "verify"],
        ["check-config"],
        ["deliver", "--once"],
    ):
        spool.smapq(*args, check=False)
        for path in spool.directory.iterdir():
            st = path.stat()
            assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid), (args, path)
