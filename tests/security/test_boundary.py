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

from tests.conftest import open_dir, root_only
from tests.deliver.kit import Queue, StandIn, make_queue, peek_log, standin, stop, wait_for

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
