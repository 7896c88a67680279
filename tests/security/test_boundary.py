"""Finding 1 of the hardening review: a process running as smap's uid must not reach
smapd or anything smapd runs -- no ptrace, no signal, no memory access.

Real processes throughout: smapd runs as root and drops to the table's userid, the
stand-in sendmail it starts is held running, and ``attacker.py`` plays a compromised
smap (pre-jail steps as root, then smap's uid) and tries each way in with real system
calls. The control runs show the hole exists without the fix, so the other asserts
can fail.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Spool, open_dir, program, root_only, write_table
from tests.deliver.kit import Queue, StandIn, make_queue, peek_log, standin, stop, wait_for
from tests.receive.conftest import Rig
from tests.receive.superserver import SuperServer

__all__ = ["open_dir", "standin"]

pytestmark = [root_only, pytest.mark.privileged, pytest.mark.integration]

ATTACKER = Path(__file__).with_name("attacker.py")
NOBODY = pwd.getpwnam("nobody")
# What "reaching" a process means; pidfd_open and F_SETOWN are checked only when they
# are used to signal, so for a foreign uid they succeed and reach nothing.
REACH = ("ptrace", "kill", "tgkill", "process_vm_readv", "prlimit")
EVERY = (*REACH, "pidfd_open", "f_setown")


def attack(
    uid: int, gid: int, pids: list[int], *flags: str, jail: Path | None = None
) -> dict[int, dict[str, str]]:
    cmd = [sys.executable, str(ATTACKER), str(uid), str(gid), *flags]
    if jail is not None:
        cmd += ["--jail", str(jail)]
    proc = subprocess.run(
        [*cmd, *map(str, pids)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return {int(k): v for k, v in json.loads(proc.stdout).items()}


class Delivering:
    """smapd running, with one stand-in sendmail held mid-delivery."""

    def __init__(self, q: Queue, standin: StandIn) -> None:
        self.q = q
        self.standin = standin
        standin.hold()
        self.qid = q.add(["a@x.example"])
        self.daemon = q.start_daemon()
        calls = wait_for(standin.calls, what="sendmail started")
        self.smapd = self.daemon.pid
        self.sendmail = calls[0].pid

    def finish(self) -> None:
        self.standin.release()
        wait_for(lambda: self.q.row(self.qid).state == "delivered", what="delivered")
        code, log = stop(self.daemon)
        assert code == 0, log


@pytest.fixture
def shared(open_dir: Path, standin: StandIn) -> Iterator[Delivering]:
    """The seed's table: smap and smapd share one userid."""
    q = make_queue(open_dir, str(standin.path), "smapd: wakeup 3600\n", user="nobody")
    run = Delivering(q, standin)
    try:
        yield run
    finally:
        standin.release()
        if run.daemon.poll() is None:
            stop(run.daemon)


def test_shared_uid_control_same_uid_reaches_the_sendmail_child(shared: Delivering) -> None:
    """The finding as reported: without the filter, smap's uid attaches to sendmail."""
    got = attack(NOBODY.pw_uid, NOBODY.pw_gid, [shared.sendmail], jail=shared.q.spool.directory)
    assert got[shared.sendmail]["ptrace"] == "ok"
    assert got[shared.sendmail]["kill"] == "ok"
    shared.finish()


def test_shared_uid_confined_smap_reaches_nothing(shared: Delivering) -> None:
    pids = [shared.smapd, shared.sendmail]
    got = attack(NOBODY.pw_uid, NOBODY.pw_gid, pids, "--confine", jail=shared.q.spool.directory)
    for pid in pids:
        for name in EVERY:
            assert got[pid][name] == "EPERM", (pid, name, got)
        assert got[pid]["proc_mem"] == "ENOENT"  # no /proc in the jail
    shared.finish()  # and delivery went on undisturbed


def test_shared_uid_jail_off_control_writes_sendmail_memory(shared: Delivering) -> None:
    """Unjailed, /proc/PID/mem of a same-uid process opens for writing: no ptrace needed."""
    got = attack(NOBODY.pw_uid, NOBODY.pw_gid, [shared.sendmail])
    assert got[shared.sendmail]["proc_mem"] == "ok"
    shared.finish()


def test_shared_uid_jail_off_confined_smap_reaches_nothing(shared: Delivering) -> None:
    pids = [shared.smapd, shared.sendmail]
    got = attack(NOBODY.pw_uid, NOBODY.pw_gid, pids, "--confine", "--hide-proc")
    for pid in pids:
        for name in EVERY:
            assert got[pid][name] == "EPERM", (pid, name, got)
        assert got[pid]["proc_mem"] in ("ENOENT", "EACCES"), got
    # The host's /proc is untouched: the mount was private to the attacker.
    assert Path(f"/proc/{shared.sendmail}/status").exists()
    shared.finish()


def test_smapd_itself_is_not_dumpable_even_when_started_as_its_user(
    open_dir: Path, standin: StandIn
) -> None:
    """Started by a supervisor directly as its uid (no drop from root), smapd must still
    refuse ptrace and /proc/PID/mem to that uid."""
    q = make_queue(open_dir, str(standin.path), "smapd: wakeup 3600\n", user="nobody")
    os.chown(q.spool.table, NOBODY.pw_uid, NOBODY.pw_gid)  # the invoking user's own table
    daemon = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups",
         sys.executable.replace("python", "smapq"), "-t", str(q.spool.table), "deliver",
         "--daemon"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: "running as uid" in peek_log(daemon), what="smapd running")
        got = attack(NOBODY.pw_uid, NOBODY.pw_gid, [daemon.pid])
        assert got[daemon.pid]["ptrace"] == "EPERM"
        assert got[daemon.pid]["proc_mem"] == "EACCES"
    finally:
        stop(daemon)


DAEMON = pwd.getpwnam("daemon")


def separate_uids_table(root: Path, standin: StandIn) -> Queue:
    """smapd with a uid of its own: the two share only the queue's group."""
    table = write_table(
        root / "netperm-table",
        f"smap, smapd: directory {root}/spool\nsmapd: baddir {root}/bad\n"
        "smap: userid nobody\nsmapd: userid daemon\nsmap, smapd: groupid nogroup\n"
        f"smapd: sendmail {standin.path}\nsmapd: wakeup 3600\n",
    )
    spool = Spool(root, table)
    spool.smapq("init")
    return Queue(spool, str(standin.path))


def test_separate_uids_init_shares_the_queue_through_the_group(
    open_dir: Path, standin: StandIn
) -> None:
    q = separate_uids_table(open_dir, standin)
    st = q.spool.directory.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o770)
    st = q.spool.db.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o660)
    st = q.spool.baddir.stat()
    assert (st.st_uid, st.st_mode & 0o7777) == (DAEMON.pw_uid, 0o700)
    check = q.spool.smapq("check-config", check=False)
    assert "share uid" not in check.stderr


def test_separate_uids_need_a_shared_group(open_dir: Path) -> None:
    table = open_dir / "netperm-table"
    table.write_text(
        f"smap, smapd: directory {open_dir}/spool\nsmap: userid nobody\nsmapd: userid daemon\n"
    )
    table.chmod(0o600)
    proc = subprocess.run(
        [sys.executable.replace("python", "smapq"), "-t", str(table), "init"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "must share a group" in proc.stderr and "Traceback" not in proc.stderr
    assert not (open_dir / "spool").exists()


def test_separate_uids_unconfined_smap_uid_reaches_nothing(
    open_dir: Path, standin: StandIn
) -> None:
    """With a uid of its own for smapd the kernel's uid checks suffice: even a process of
    smap's uid that never went through smap's filter reaches neither smapd nor sendmail,
    and mail still flows from smap (as nobody) through smapd (as daemon)."""
    q = separate_uids_table(open_dir, standin)
    server = SuperServer("inetd", [program("smap"), "-t", str(q.spool.table)], open_dir)
    try:
        rig = Rig(q.spool, server)
        c = rig.client()
        for line in (b"HELO c", b"MAIL FROM:<s@c.example>", b"RCPT TO:<r@x.example>", b"DATA"):
            assert c.cmd(line)[:1] in (b"2", b"3"), line
        received = c.cmd(b"Subject: via smap\r\n\r\nhi\r\n.").split()[-1].decode()
        c.close()
        rig.idle()
    finally:
        server.stop()
    run = Delivering(q, standin)
    try:
        pids = [run.smapd, run.sendmail]
        got = attack(NOBODY.pw_uid, NOBODY.pw_gid, pids)
        for pid in pids:
            for name in REACH:
                assert got[pid][name] == "EPERM", (pid, name, got)
            assert got[pid]["proc_mem"] == "EACCES"
        assert standin.calls()[0].uid == DAEMON.pw_uid
        assert standin.calls()[0].gid == NOBODY.pw_gid
        run.finish()
        assert q.row(received).state == "delivered"
    finally:
        standin.release()
        if run.daemon.poll() is None:
            stop(run.daemon)
