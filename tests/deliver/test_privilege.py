"""As root, smapd drops to its userid/groupid with no supplementary groups (FWTK did not
call setgroups), before it touches the queue; sendmail inherits exactly that."""

from __future__ import annotations

import grp
import os
import pwd
import signal
import stat
from pathlib import Path

import pytest

from smapq.errors import EX_NOPERM
from tests.conftest import open_dir, root_only, write_table
from tests.deliver.kit import StandIn, make_queue, peek_log, standin, stop, wait_for

__all__ = ["open_dir", "standin"]

pytestmark = [
    root_only,
    pytest.mark.privileged,
    pytest.mark.integration,
    pytest.mark.usefixtures("backend"),
]


def test_sendmail_runs_as_smapd_user_without_root_groups(open_dir: Path, standin: StandIn) -> None:
    os.setgroups([0, 4])  # give root supplementary groups that must not survive
    try:
        q = make_queue(open_dir, str(standin.path), user="nobody")
        qid = q.add(["a@x.example"], body=b"as nobody\n")
        proc = q.deliver()
    finally:
        os.setgroups([])
    assert proc.returncode == 0, proc.stderr
    assert "dropped privileges" in proc.stderr
    nobody = pwd.getpwnam("nobody")
    [call] = standin.calls()
    assert call.uid == nobody.pw_uid
    assert call.gid == nobody.pw_gid
    assert call.groups == []
    assert call.stdin == b"as nobody\n"
    assert q.row(qid).state == "delivered"
    # The queue files still belong to the user smap and smapd share.
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(q.spool.db) + suffix)
        if path.exists():
            assert path.stat().st_uid == nobody.pw_uid, path


def test_groupid_is_applied(open_dir: Path, standin: StandIn) -> None:
    group = grp.getgrnam("nogroup").gr_gid
    q = make_queue(open_dir, str(standin.path), "smapd: groupid nogroup\n", user="nobody")
    q.add(["a@x.example"])
    assert q.deliver().returncode == 0
    assert standin.calls()[0].gid == group


def test_uid_zero_is_refused(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path), "smapd: userid 0\n")
    q.add(["a@x.example"])
    proc = q.deliver()
    assert proc.returncode == EX_NOPERM
    assert "refused" in proc.stderr
    assert standin.calls() == []


def test_sighup_rereads_a_root_only_table_after_the_drop(open_dir: Path) -> None:
    first = StandIn(open_dir / "first")
    second = StandIn(open_dir / "second")
    q = make_queue(open_dir, str(first.path), "smapd: wakeup 3600\n", user="nobody")
    assert stat.S_IMODE(q.spool.table.stat().st_mode) == 0o600
    daemon = q.start_daemon()
    try:
        wait_for(lambda: "dropped privileges" in peek_log(daemon), what="drop logged")
        # Edited in place (same inode): smapd, now nobody, re-reads it through the
        # descriptor it kept from before the drop.
        text = q.spool.table.read_text().replace(str(first.path), str(second.path))
        with open(q.spool.table, "w") as fh:
            fh.write(text)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "table re-read" in peek_log(daemon), what="reload logged")
        qid = q.add(["a@x.example"])
        wait_for(lambda: q.row(qid).state == "delivered", what="delivery after reload")
        # Replaced (new inode): cannot be read as nobody; said so, old settings kept.
        replacement = q.spool.table.with_name("table.new")
        write_table(replacement, text.replace(str(second.path), str(first.path)))
        os.replace(replacement, q.spool.table)
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: "restart smapd" in peek_log(daemon), what="replacement reported")
        other = q.add(["b@x.example"])
        wait_for(lambda: q.row(other).state == "delivered", what="delivery with old table")
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    assert first.calls() == []
    assert [c.recipients for c in second.calls()] == [["a@x.example"], ["b@x.example"]]
