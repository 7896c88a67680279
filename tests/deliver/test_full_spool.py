"""Finding 2 of the hardening review: a full spool must drain.

Reported: on a 2 MB tmpfs, once intake answered 452, ``smapq deliver --once`` failed
its claim with "database or disk is full" nine times, printed a traceback, exited 70
and delivered nothing. Here the spool is a real 2 MB tmpfs, filled by the real
receiver (jailed, as nobody) until it answers 452; the deliverer is the installed
program. Whether the disk is full to the last byte or full down to a reserve, no
command ends in a traceback, no claim or outcome is lost, and the queue drains as
soon as there is room -- without a restart.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smapq.errors import EX_TEMPFAIL
from tests.conftest import Spool, open_dir, program, root_only, write_table
from tests.deliver.kit import Queue, StandIn, peek_log, standin, stop, wait_for

__all__ = ["open_dir", "standin"]

pytestmark = [root_only, pytest.mark.privileged, pytest.mark.integration]

BODY = (b"x" * 76 + b"\r\n") * 100  # 7.8 KB per message
# What intake leaves free when it stops (the reserve; here held by a file until
# intake refused). One SMTP session writes its WAL without a checkpoint, and folding
# that WAL into the database needs about a tenth of its size: 256 KB covers it.
RESERVE = 256 * 1024


class FullSpool:
    """A spool on its own 2 MB tmpfs, and a file that takes up room beside it."""

    def __init__(self, root: Path, standin: StandIn) -> None:
        self.fs = root / "fs"
        self.fs.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "smapq-test", str(self.fs)],
            check=True,
        )
        self.filler = self.fs / "filler"
        table = write_table(
            root / "netperm-table",
            f"smap, smapd: directory {self.fs}/spool\nsmap, smapd: userid nobody\n"
            f"smapd: baddir {root}/bad\nsmapd: sendmail {standin.path}\n"
            "smap: maxbytes 64k\nsmapd: wakeup 3600\nsmapd: minbackoff 1\n",
        )
        self.spool = Spool(root, table)
        self.spool.directory = self.fs / "spool"
        self.spool.db = self.spool.directory / "smapq.db"
        self.spool.smapq("init")
        self.q = Queue(self.spool, str(standin.path))

    def take(self, size: int | None = None) -> None:
        """Fill ``size`` bytes (all that is left when None) with the filler file."""
        # Unbuffered: a buffered file keeps what a short write left over and raises
        # ENOSPC again when closed.
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while size is None or size > 0:
                chunk = 65536 if size is None else min(65536, size)
                written = os.write(fd, b"\0" * chunk)
                if size is not None:
                    size -= written
        except OSError as exc:
            if exc.errno != errno.ENOSPC:  # ENOSPC: full, as asked
                raise
        finally:
            os.close(fd)

    def give_back(self) -> None:
        self.filler.unlink(missing_ok=True)

    def free(self) -> int:
        st = os.statvfs(self.fs)
        return st.f_bavail * st.f_frsize

    def receive_until_refused(self) -> list[str]:
        """One SMTP session with the real smap: messages until it answers 4xx."""
        a, b = socket.socketpair()
        proc = subprocess.Popen(
            [program("smap"), "-t", str(self.spool.table)],
            stdin=b.fileno(), stdout=b.fileno(), stderr=subprocess.DEVNULL,
        )  # fmt: skip
        b.close()
        accepted = []
        with a, a.makefile("rwb") as f:

            def cmd(line: bytes) -> bytes:
                f.write(line + b"\r\n")
                f.flush()
                reply = f.readline()
                while reply[3:4] == b"-":
                    reply = f.readline()
                return reply

            assert f.readline().startswith(b"220 ")
            cmd(b"EHLO filler.example")
            for n in range(1000):
                if not cmd(b"MAIL FROM:<s@filler.example>").startswith(b"250"):
                    break
                cmd(b"RCPT TO:<r%d@x.example>" % n)
                cmd(b"DATA")
                reply = cmd(b"Subject: %d\r\n\r\n" % n + BODY + b".")
                if not reply.startswith(b"250"):
                    assert reply.startswith(b"452 4.3.1"), reply
                    break
                accepted.append(reply.split()[-1].decode())
            cmd(b"QUIT")
        proc.wait(timeout=60)
        assert accepted, "nothing was accepted before the spool was full"
        return accepted

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.fs)], check=False)


@pytest.fixture
def full(open_dir: Path, standin: StandIn) -> Iterator[FullSpool]:
    fs = FullSpool(open_dir, standin)
    try:
        yield fs
    finally:
        fs.close()


def delivered_once_each(standin: StandIn, accepted: list[str], q: Queue) -> None:
    for qid in accepted:
        assert q.row(qid).state == "delivered", qid
    rcpts = sorted(c.recipients[0] for c in standin.calls())
    assert rcpts == sorted(set(rcpts)), "a message was sent twice"
    assert len(rcpts) == len(accepted)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def test_full_down_to_the_reserve_drains(full: FullSpool, standin: StandIn) -> None:
    """Intake stops at a reserve (here: room held by a file, given back once intake
    refused); the deliverer needs no more than that to deliver everything."""
    full.take(RESERVE)
    accepted = full.receive_until_refused()
    full.give_back()
    proc = full.q.deliver()
    no_traceback(proc.stderr)
    assert proc.returncode == 0, proc.stderr
    delivered_once_each(standin, accepted, full.q)


def test_full_to_the_last_byte_fails_in_one_line_then_drains(
    full: FullSpool, standin: StandIn
) -> None:
    full.take(RESERVE)
    accepted = full.receive_until_refused()
    full.take()  # someone else's file takes the rest
    proc = full.q.deliver()
    no_traceback(proc.stderr)
    assert proc.returncode == EX_TEMPFAIL, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "full" in last and last.startswith("smapq: "), proc.stderr
    assert full.q.states().get("delivering", 0) == 0  # no claim was left behind
    full.give_back()
    proc = full.q.deliver()
    assert proc.returncode == 0, proc.stderr
    delivered_once_each(standin, accepted, full.q)


def test_daemon_survives_a_full_spool_and_drains_when_room_comes_back(
    full: FullSpool, standin: StandIn
) -> None:
    full.take(RESERVE)
    accepted = full.receive_until_refused()
    full.take()
    daemon = full.q.start_daemon()
    try:
        wait_for(lambda: "full" in peek_log(daemon), what="the daemon to notice")
        assert daemon.poll() is None, peek_log(daemon)
        full.give_back()
        wait_for(lambda: full.q.states() == {"delivered": len(accepted)}, 120, "the queue drained")
    finally:
        code, log = stop(daemon)
    no_traceback(log)
    assert code == 0, log
    delivered_once_each(standin, accepted, full.q)


def test_an_outcome_waits_out_a_full_disk_and_is_recorded_once(
    full: FullSpool, standin: StandIn
) -> None:
    """The disk fills while sendmail runs: the delivered outcome cannot be written, is
    kept, and is recorded once room returns -- the message is not sent again."""
    qid = full.q.add(["held@x.example"])
    standin.hold()
    daemon = full.q.start_daemon()
    try:
        wait_for(standin.calls, what="sendmail started")
        full.take()
        standin.release()
        wait_for(lambda: "full" in peek_log(daemon), what="the daemon to notice")
        full.give_back()
        wait_for(lambda: full.q.row(qid).state == "delivered", 120, "the outcome recorded")
    finally:
        standin.release()
        code, log = stop(daemon)
    no_traceback(log)
    assert code == 0, log
    assert len(standin.calls()) == 1


def test_a_stop_while_the_disk_is_full_ends_promptly_and_loses_nothing(
    full: FullSpool, standin: StandIn
) -> None:
    """SIGTERM while an outcome cannot be written: the daemon does not wait for room; the
    message stays claimed until its lease expires and is then delivered again -- the
    one duplicate at-least-once allows (docs/SECURITY.md), and it is counted here."""
    table = full.spool.table
    table.write_text(table.read_text() + "smapd: lease 5\n")
    qid = full.q.add(["held@x.example"])
    standin.hold()
    daemon = full.q.start_daemon()
    try:
        wait_for(standin.calls, what="sendmail started")
        full.take()
        standin.release()
        wait_for(lambda: "full" in peek_log(daemon), what="the daemon to notice")
    finally:
        standin.release()
        code, log = stop(daemon)
    no_traceback(log)
    assert code == 0, log
    assert "leaving rows to lease expiry" in log
    full.give_back()
    assert full.q.row(qid).state == "delivering"  # nothing lost: still claimed
    wait_for(lambda: full.q.row(qid).lease_expires_at < time.time(), what="lease expiry")
    proc = full.q.deliver()
    assert proc.returncode == 0, proc.stderr
    assert full.q.row(qid).state == "delivered"
    assert len(standin.calls()) == 2  # the duplicate: sent before the stop, and again
