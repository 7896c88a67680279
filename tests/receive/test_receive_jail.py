"""The jail, as root: real chroot and uid drop, jail off, syslog, disk full."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smapq.smtp import replies as R
from tests.conftest import make_spool, program, root_only
from tests.receive.conftest import Rig
from tests.receive.superserver import Client, proc_status, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.privileged, root_only]

NOBODY = pwd.getpwnam("nobody")


def open_session(rig: Rig) -> tuple[int, Client]:
    """Connect, say EHLO, and return the pid of the receiver serving us."""
    c = rig.client()
    assert c.cmd(b"EHLO c").startswith(b"250-")
    (pid,) = rig.server.children(running=True)
    return pid, c


@pytest.mark.parametrize("kind", ["inetd", "systemd-socket-activate", "serve"])
@pytest.mark.usefixtures("backend")
def test_receiver_is_chrooted_and_runs_as_nobody(
    rig_factory: Callable[..., Rig], kind: str
) -> None:
    rig = rig_factory(kind=kind)
    pid, _ = open_session(rig)
    st = proc_status(pid)
    assert st["Uid"] == [str(NOBODY.pw_uid)] * 4
    assert st["Gid"] == [str(NOBODY.pw_gid)] * 4
    assert st["Groups"] == []  # setgroups([]): none of root's groups survive
    assert os.readlink(f"/proc/{pid}/root") == str(rig.spool.directory)
    assert os.readlink(f"/proc/{pid}/cwd") == str(rig.spool.directory)
    assert st["CapEff"] == ["0000000000000000"]
    # confined: no process it runs can reach another of its uid (smapq.sandbox)
    assert (st["NoNewPrivs"], st["Seccomp"]) == (["1"], ["2"])


@pytest.mark.usefixtures("backend")
def test_jail_off_still_drops_privileges_and_says_so(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory("smap: jail off\n", kind=transport)
    pid, c = open_session(rig)
    st = proc_status(pid)
    assert st["Uid"] == [str(NOBODY.pw_uid)] * 4
    assert os.readlink(f"/proc/{pid}/root") == "/"
    # inetd put the socket on fd 2 too: the notice must not have reached the client.
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert c.eof()
    assert rig.rows("SELECT detail FROM events WHERE kind = 'jail'") == [
        (f"jail off: not chrooted into {rig.spool.directory} (smap: jail off)",)
    ]


def test_jail_off_notice_goes_to_stderr_when_stderr_is_not_the_connection(
    open_dir: Path,
) -> None:
    spool = make_spool(open_dir, "smap: jail off\n", user="nobody")
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.Popen(
            [program("smap"), "-t", str(spool.table)],
            stdin=b.fileno(),
            stdout=b.fileno(),
            stderr=subprocess.PIPE,
        )
        b.close()
        a.sendall(b"QUIT\r\n")
        data = b""
        while chunk := a.recv(4096):
            data += chunk
        _, err = proc.communicate(timeout=120)
    assert data.startswith(b"220 ")
    assert b"jail off: not chrooted" in err


def test_root_without_userid_is_refused(open_dir: Path) -> None:
    spool = make_spool(open_dir)  # no userid: the table turns the jail off
    table = spool.table
    table.write_text(table.read_text().replace("smap: jail off\n", ""))
    proc = subprocess.run(
        [program("smap"), "-t", str(table)], input=b"QUIT\r\n", capture_output=True, timeout=120
    )
    assert proc.stdout.startswith(b"421 4.3.0 ")
    assert proc.returncode == 77
    assert b"userid is not set" in proc.stderr


@pytest.fixture
def syslog_socket() -> Iterator[list[bytes]]:
    """A real datagram socket at /dev/log, standing in for syslogd."""
    if os.path.exists("/dev/log"):
        pytest.skip("/dev/log belongs to a running syslog daemon")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("/dev/log")
    except OSError as exc:  # another test run took it since the check
        sock.close()
        pytest.skip(f"cannot bind /dev/log: {exc}")
    lines: list[bytes] = []
    stop = threading.Event()

    def pump() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                lines.append(sock.recv(4096))
            except TimeoutError:
                continue

    thread = threading.Thread(target=pump)
    thread.start()
    try:
        yield lines
    finally:
        stop.set()
        thread.join()
        sock.close()
        os.unlink("/dev/log")


def test_syslog_lines_like_smap(syslog_socket: list[bytes], rig: Rig) -> None:
    # /dev/log first: smapq serve connects to it when its worker starts.
    c = rig.client()
    (pid,) = rig.server.children(running=True)
    # Only this receiver's lines: another test run's receivers may log here too.
    ours = f"smap[{pid}]: ".encode()

    def mine() -> list[bytes]:
        return [line for line in syslog_socket if ours in line]

    c.cmd(b"HELO bigco.com")
    c.cmd(b"MAIL FROM:<root@bigco.com>")
    c.cmd(b"RCPT TO:<a@bigco.com>")
    c.cmd(b"RCPT TO:<b@bigco.com>")
    c.cmd(b"DATA")
    qid = c.cmd(b"This is a test.\r\n.").split()[-1].decode()
    c.cmd(b"MAIL FROM:<-x@y.z>")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d\x1be@f.g>")
    c.cmd(b"VRFY root")
    c.cmd(b"QUIT")
    assert c.eof()
    rig.idle()
    # The pump thread may still be reading datagrams.
    wait_until(lambda: any(b" exiting " in line for line in mine()), 120, "no exit line")
    text = b"\n".join(mine()).decode()
    mail_info = f"<{2 * 8 + 6}>"  # LOG_MAIL | LOG_INFO
    assert f"{mail_info}" in text
    assert "connect host=unknown/127.0.0.1" in text
    for rcpt in ("a@bigco.com", "b@bigco.com"):
        line = f"host=unknown/127.0.0.1 bytes=17 from=<root@bigco.com> to=<{rcpt}> id={qid}"
        assert line in text
    assert (
        "securityalert: reject host=unknown/127.0.0.1 code=553"
        " reason=sender: address starts with '-' address=-x@y.z" in text
    )
    # A refusal names the refused address, control characters shown as "?".
    assert (
        "reject host=unknown/127.0.0.1 code=501 reason=recipient: control character in"
        " address address=d?e@f.g" in text
    )
    assert "VRFY root (unknown/127.0.0.1)" in text
    assert "exiting host=unknown/127.0.0.1 messages=1 bytes=17 reason=quit" in text


@pytest.fixture
def tiny_fs(open_dir: Path) -> Iterator[Path]:
    mnt = open_dir / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)])
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave: int) -> Path:
    """Fill ``fs`` with a file, then give back ``leave`` bytes."""
    filler = fs / "filler"
    # Unbuffered: a buffered file keeps what a short write left over and raises ENOSPC
    # again when closed, unless the free space happened to be a multiple of the chunk.
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def test_disk_full_is_452_and_nothing_is_half_stored(
    rig_factory: Callable[..., Rig], tiny_fs: Path, transport: str
) -> None:
    """Below the reserve (1.5 x maxbytes) MAIL gets 452 4.3.1, as Postfix's
    queue_minfree; a disk that fills during DATA fails the commit with 452 too; nothing
    is half-stored, and mail is taken again once there is room."""
    spool = make_spool(tiny_fs, "smap: maxbytes 1m\n", user="nobody")
    rig = rig_factory(spool=spool, kind=transport)
    c = rig.client()
    c.cmd(b"EHLO c")
    body = b"".join(b"%07d " % i + b"z" * 70 + b"\r\n" for i in range(8000))  # 624 kB
    filler = _fill(tiny_fs, 256 * 1024)  # room for the WAL index only
    assert c.cmd(b"MAIL FROM:<a@b.c>") == R.R452_NO_SPACE
    filler.unlink()
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    filler = _fill(tiny_fs, 256 * 1024)  # the disk fills while the client sends
    assert c.cmd(body + b".") == R.R452_NO_SPACE
    filler.unlink()
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    c.cmd(b"DATA")
    assert c.cmd(body + b".").startswith(b"250 ")
    c.cmd(b"QUIT")
    assert c.eof()
    assert rig.rows("SELECT count(*), sum(size) FROM messages") == [(1, len(body))]
    rejects = rig.rows("SELECT code, detail FROM events WHERE kind = 'reject' ORDER BY id")
    assert [code for code, _ in rejects] == [452, 452]
    assert "below minfree" in str(rejects[0][1])
    assert "full" in str(rejects[1][1])
