"""``smapq-maildrop``: the demo's sendmail-compatible Maildir delivery, and smapd using it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from smapq.deliver import maildrop
from tests.conftest import program
from tests.deliver.kit import make_queue


def _drop(maildir: Path, *args: str, data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SMAPQ_MAILDIR": str(maildir)}
    return subprocess.run(
        [program("smapq-maildrop"), *args], input=data, capture_output=True, env=env
    )


def test_one_file_per_message_in_new(tmp_path: Path) -> None:
    body = b"Subject: x\n\n.\n..\nno newline"
    proc = _drop(tmp_path / "md", "-oi", "-f", "<>", "--", "a@x", "b@y", data=body)
    assert proc.returncode == 0, proc.stderr
    [name] = os.listdir(tmp_path / "md" / "new")
    assert os.listdir(tmp_path / "md" / "tmp") == []
    path = tmp_path / "md" / "new" / name
    assert path.read_bytes() == b"Return-Path: <>\nDelivered-To: a@x, b@y\n" + body
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "sender", "rcpts"),
    [
        (["-oi", "-f", "s@x", "--", "a@x"], "s@x", ["a@x"]),
        (["-i", "-fs@x", "a@x", "b@x"], "s@x", ["a@x", "b@x"]),
        (["-r", "<s@x>", "-oem", "a@x"], "s@x", ["a@x"]),
        (["--", "-strange@x"], "", ["-strange@x"]),
    ],
)
def test_sendmail_options(args: list[str], sender: str, rcpts: list[str]) -> None:
    assert maildrop.parse(args) == (sender, rcpts)


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    assert _drop(tmp_path, "-oi", "-f", "s@x").returncode == 64
    assert _drop(tmp_path, "-f").returncode == 64


def test_unwritable_maildir_exits_with_a_sysexit(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _drop(blocker, "a@x", data=b"x")
    assert proc.returncode == 73
    assert b"smapq-maildrop:" in proc.stderr


@pytest.mark.usefixtures("backend")
def test_smapd_delivers_into_a_maildir(tmp_path: Path) -> None:
    q = make_queue(tmp_path, program("smapq-maildrop"))
    trace = "Received: from c by mx\n"
    body = b"Subject: demo\n\nhello\n"
    qid = q.add(["a@x.example"], body=body, trace=trace, sender="s@example.org")
    env = {**os.environ, "SMAPQ_MAILDIR": str(tmp_path / "Maildir")}
    proc = q.spool.smapq("deliver", "--once", check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    [name] = os.listdir(tmp_path / "Maildir" / "new")
    data = (tmp_path / "Maildir" / "new" / name).read_bytes()
    head = b"Return-Path: <s@example.org>\nDelivered-To: a@x.example\n"
    assert data == head + trace.encode() + body
    assert q.row(qid).state == "delivered"
