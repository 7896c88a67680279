"""`smapq init`, `check-config` and `db` through the installed CLI, as an operator runs them."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Backend, Spool, make_spool, program, root_only, write_table


def run(table: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [program("smapq"), "-t", str(table), *args]
    if user:
        pw = pwd.getpwnam(user)
        cmd = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("smapq: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


def test_init_creates_spool_baddir_and_database_then_is_idempotent(
    tmp_path: Path, backend: Backend
) -> None:
    spool = make_spool(tmp_path, backend=backend, cli_init=True)
    for d in (spool.directory, spool.baddir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    if not spool.database:  # the SQLite file; PostgreSQL's files are the server's
        assert stat.S_IMODE(spool.db.stat().st_mode) == 0o600
    again = spool.smapq("init")
    assert "nothing to change" in again.stdout
    assert spool.smapq("db", "current").stdout.strip() == "0002"
    assert "is current" in spool.smapq("db", "check").stdout


@pytest.mark.sqlite_only("the modes of the SQLite file")
def test_init_repairs_modes(spool: Spool) -> None:
    spool.directory.chmod(0o755)
    spool.db.chmod(0o644)
    out = spool.smapq("init").stdout
    assert f"{spool.directory}: mode set to 0700" in out
    assert f"{spool.db}: mode set to 0600" in out
    assert stat.S_IMODE(spool.db.stat().st_mode) == 0o600


@root_only
@pytest.mark.privileged
def test_init_as_root_gives_the_spool_to_the_smap_user(open_dir: Path) -> None:
    spool = make_spool(open_dir, user="nobody", cli_init=True)
    nobody = pwd.getpwnam("nobody")
    for path in (spool.directory, spool.baddir, spool.db):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
    # The smap user can open and write the queue it was given (WAL files included).
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            f"import sqlite3; c=sqlite3.connect('{spool.db}'); "
            "c.execute('INSERT INTO events(at, kind) VALUES (0, \\'probe\\')'); c.commit()",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr


def test_check_config_prints_effective_settings_and_origins(spool: Spool) -> None:
    # The settings are printed whatever the machine checks find (tests/test_machine_checks).
    out = spool.smapq("check-config", check=False).stdout
    assert f"smap:   directory        {spool.directory}" in out
    assert "smapd:  sendmail         /usr/lib/sendmail" in out
    assert "# default" in out and f"# {spool.table}:1" in out


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ("smap: userid no-such-user\n", ":1: userid: unknown user 'no-such-user'"),
        ("smap: timeout\n", ":1: timeout: takes exactly one argument"),
        ("smap: bogus 1\n", ":1: bogus: unknown keyword for smap"),
        ("smap: userid 0\n", ":1: userid: smap must not run as root"),
        ("smap userid 5\n", ":1: missing ':'"),
    ],
)
def test_bad_table_is_one_line_exit_78_and_creates_nothing(
    tmp_path: Path, table: str, fragment: str
) -> None:
    path = write_table(tmp_path / "netperm-table", f"*: directory {tmp_path}/spool\n" + table)
    for cmd in (["init"], ["check-config"]):
        proc = run(path, *cmd)
        one_line_error(proc, 78, str(path) + fragment.split(":", 2)[0] + ":")
        assert fragment.split(": ", 1)[1] in proc.stderr
    assert not (tmp_path / "spool").exists()


def test_writable_table_is_refused(tmp_path: Path) -> None:
    path = write_table(tmp_path / "netperm-table", "smap: timeout 10\n")
    path.chmod(0o666)
    one_line_error(run(path, "check-config"), 78, "writable by group or others")


def test_unwritable_parent_is_one_line_and_nothing_half_created(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    table = write_table(
        tmp_path / "netperm-table",
        f"smap, smapd: directory {locked}/spool\nsmapd: baddir {tmp_path}/bad\nsmap: jail off\n",
    )
    locked.chmod(0o500)
    if os.geteuid() == 0:
        # root writes anywhere; make the parent a file instead, which nobody can mkdir in.
        locked.chmod(0o700)
        locked.rmdir()
        locked.write_text("")
    proc = run(table, "init")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists(), "baddir was created although init failed"


@root_only
@pytest.mark.privileged
def test_unprivileged_user_cannot_init_a_spool_for_another_uid(tmp_path: Path) -> None:
    work = Path(f"/tmp/smapq-unpriv-{os.getpid()}")
    work.mkdir(mode=0o755)
    os.chown(work, pwd.getpwnam("nobody").pw_uid, -1)  # nobody's own directory
    try:
        table = work / "netperm-table"
        table.write_text(f"smap, smapd: directory {work}/spool\nsmap, smapd: userid daemon\n")
        table.chmod(0o600)
        os.chown(table, pwd.getpwnam("nobody").pw_uid, -1)
        proc = run(table, "init", user="nobody")
        if "Permission denied" in proc.stderr and "python" in proc.stderr:
            pytest.fail(f"the venv must be readable by nobody for this test: {proc.stderr}")
        one_line_error(proc, 1, "only root can do that")
        assert not (work / "spool").exists()
    finally:
        shutil.rmtree(work)


def test_cli_usage_errors_are_one_line(spool: Spool) -> None:
    proc = run(spool.table, "no-such-command")
    one_line_error(proc, 64, "No such command")


def test_every_command_has_help_text() -> None:
    proc = subprocess.run([program("smapq"), "--help"], capture_output=True, text=True, check=True)
    commands = [
        line.split()[0] for line in proc.stdout.split("Commands:")[1].splitlines() if line.strip()
    ]
    assert {"init", "check-config", "db"} <= set(commands)
    for name in commands:
        sub = subprocess.run(
            [program("smapq"), name, "--help"], capture_output=True, text=True, check=True
        )
        assert "Usage:" in sub.stdout
        body = sub.stdout.split("\n\n", 2)
        assert len(body) > 1 and body[1].strip(), f"{name} has no help text"
