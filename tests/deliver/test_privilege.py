"""As root, smapd drops to its userid/groupid with no supplementary groups (FWTK did not
call setgroups), before it touches the queue; sendmail inherits exactly that."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

import pytest

from smapq.errors import EX_NOPERM
from tests.conftest import open_dir, root_only
from tests.deliver.kit import StandIn, make_queue, standin

__all__ = ["open_dir", "standin"]

pytestmark = [root_only, pytest.mark.privileged, pytest.mark.integration]


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
