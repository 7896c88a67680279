"""smapq serve as a process tree: jailed workers, kill -9, SIGTERM drain, SIGHUP reload,
socket activation, ``smap -daemon``, and start-up errors as one line."""

from __future__ import annotations

import os
import pwd
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from smapq.smtp import replies as R
from tests.conftest import make_spool, program, root_only
from tests.receive.conftest import Rig
from tests.receive.superserver import (
    SOCKET_ACTIVATE,
    Client,
    free_port,
    listeners,
    proc_status,
    socket_inodes,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]

NOBODY = pwd.getpwnam("nobody")


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        return 0


def send_message(c: Client, body: bytes, helo: bytes = b"c") -> bytes:
    c.cmd(b"EHLO " + helo)
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    assert c.cmd(b"DATA") == R.R354_DATA
    return c.cmd(body + b"\r\n.")


def worker_of(rig: Rig, c: Client) -> int:
    """The worker whose socket is the server's end of ``c``'s connection."""
    port = c.sock.getsockname()[1]
    want = f":{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2].endswith(want) and fields[1].endswith(f":{rig.server.port:04X}"):
            inode = int(fields[9])
            for pid in rig.server.children(running=True):
                if inode in socket_inodes(pid):
                    return pid
    raise AssertionError("no worker holds the connection")


def two_workers(rig_factory: Callable[..., Rig], extra: str = "") -> Rig:
    rig = rig_factory(extra, kind="serve", serve_args=("--workers", "2", "--grace", "2"))
    wait_until(lambda: len(rig.server.children(running=True)) == 2, 60, "not two workers")
    return rig


@root_only
@pytest.mark.privileged
def test_every_worker_is_jailed(rig_factory: Callable[..., Rig]) -> None:
    rig = two_workers(rig_factory)
    rig.client().cmd(b"QUIT")
    workers = rig.server.children(running=True)
    # A worker starts as root (it reads the table) and jails itself before it serves.
    wait_until(
        lambda: all(proc_status(pid)["Uid"][0] != "0" for pid in workers), 60, "not jailed yet"
    )
    assert rig.server.proc is not None
    assert proc_status(rig.server.proc.pid)["Uid"][0] == "0"  # the supervisor stays root
    writers = [pid for pid in all_pids() if parent(pid) in workers]
    assert len(writers) == 2  # each worker's queue writer, forked inside the jail
    for pid in workers + writers:
        st = proc_status(pid)
        assert st["Uid"] == [str(NOBODY.pw_uid)] * 4
        assert st["Gid"] == [str(NOBODY.pw_gid)] * 4
        assert st["Groups"] == []
        assert st["CapEff"] == ["0000000000000000"]
        assert (st["NoNewPrivs"], st["Seccomp"]) == (["1"], ["2"])
        assert os.readlink(f"/proc/{pid}/root") == str(rig.spool.directory)


def test_a_killed_worker_is_replaced_and_loses_nothing_accepted(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = two_workers(rig_factory)
    half = rig.client()
    half.cmd(b"EHLO half")
    half.cmd(b"MAIL FROM:<half@b.c>")
    half.cmd(b"RCPT TO:<d@e.f>")
    half.cmd(b"DATA")
    half.send(b"the first half of a message\r\n")
    victim = worker_of(rig, half)
    done = []
    for i in range(6):  # some of these land on the victim, some on the other worker
        c = rig.client()
        reply = send_message(c, b"kept %d" % i)
        assert reply.startswith(b"250 ")
        done.append(reply.split()[-1].decode())
        c.cmd(b"QUIT")
    os.kill(victim, signal.SIGKILL)
    assert half.eof()  # the connection died with its worker
    wait_until(
        lambda: len(set(rig.server.children(running=True)) - {victim}) == 2,
        60,
        "the worker was not replaced",
    )
    after = rig.client()
    assert send_message(after, b"after").startswith(b"250 ")
    after.cmd(b"QUIT")
    half.close()
    rig.opened -= 1  # the killed session never wrote its events (audit only, not mail)
    stored = rig.rows("SELECT queue_id, body FROM messages", wait=False)
    wait_until(lambda: len(rig.rows("SELECT 1 FROM messages", wait=False)) == 7, 60, "missing")
    stored = rig.rows("SELECT queue_id, body FROM messages", wait=False)
    assert {q for q, _ in stored} >= set(done)
    assert sorted(bytes(b) for _, b in stored) == sorted(
        [b"kept %d\r\n" % i for i in range(6)] + [b"after\r\n"]
    )


def test_sigterm_stops_accepting_and_lets_sessions_finish(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(kind="serve", serve_args=("--grace", "3"))
    busy, idle = rig.client(), rig.client()
    busy.cmd(b"EHLO busy")
    idle.cmd(b"EHLO idle")
    proc = rig.server.proc
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not listeners(rig.server.port), 30, "still listening")
    with pytest.raises(ConnectionRefusedError):
        rig.server.connect(timeout=5)
    busy.cmd(b"MAIL FROM:<a@b.c>")
    busy.cmd(b"RCPT TO:<d@e.f>")
    busy.cmd(b"DATA")
    assert busy.cmd(b"in the grace time\r\n.").startswith(b"250 ")
    assert busy.cmd(b"QUIT") == R.R221_BYE
    assert idle.reply() == R.R421_SHUTDOWN % rig.hostname()  # after the grace time
    assert idle.eof()
    assert proc.wait(60) == 0
    assert rig.rows("SELECT body FROM messages", wait=False) == [(b"in the grace time\r\n",)]
    assert rig.rows("SELECT kind, code FROM events WHERE kind = 'shutdown'", wait=False) == [
        ("shutdown", 421)
    ]


def test_sighup_rereads_the_table_and_old_sessions_go_on(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(kind="serve")
    old = rig.client()
    old.cmd(b"EHLO old")
    (first,) = rig.server.children(running=True)
    table = rig.spool.table
    table.write_text(table.read_text() + "smap: hostname reloaded.example\n")
    assert rig.server.proc is not None
    rig.server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: len(rig.server.children(running=True)) == 2, 60, "no new worker")
    # The old worker may still accept until it has handled the supervisor's SIGTERM
    # (the new one is up first, so no client is ever refused): a session that lands
    # there meanwhile is served by the old table, as Postfix's old generation does.
    deadline = time.monotonic() + 60
    while True:
        new = rig.client(banner=False)
        banner = new.reply()
        if banner == R.R220_BANNER % b"reloaded.example":
            break
        assert banner == R.R220_BANNER % rig.hostname(), banner
        assert new.cmd(b"QUIT").startswith(b"221 ")  # no EHLO: no enhanced code
        assert time.monotonic() < deadline, "new sessions never got the re-read table"
        time.sleep(0.05)
    assert send_message(old, b"on the old worker").startswith(b"250 ")
    assert old.cmd(b"QUIT") == R.R221_BYE
    wait_until(lambda: first not in rig.server.children(running=True), 60, "old worker lives")
    new.cmd(b"QUIT")
    assert rig.rows("SELECT body FROM messages") == [(b"on the old worker\r\n",)]


def test_sighup_with_a_bad_table_keeps_the_running_workers(
    rig_factory: Callable[..., Rig],
) -> None:
    rig = rig_factory(kind="serve")
    (worker,) = rig.server.children(running=True)
    table = rig.spool.table
    table.write_text(table.read_text() + "smap: maxbytes lots\n")
    assert rig.server.proc is not None
    rig.server.proc.send_signal(signal.SIGHUP)
    log = rig.server.log
    wait_until(lambda: b"reload refused" in log.read_bytes(), 60, "no refusal logged")
    assert f"{table}:".encode() in log.read_bytes()  # names the file and line
    assert rig.server.children(running=True) == [worker]
    c = rig.client()
    assert send_message(c, b"still served").startswith(b"250 ")


def serve_argv(table: Path, *extra: str) -> list[str]:
    return [program("smapq"), "-t", str(table), "serve", "--grace", "1", *extra]


def run_until_served(argv: list[str], port: int, family: int = socket.AF_INET) -> bytes:
    """Start ``argv``, deliver one message to ``port``, stop it; the 250 reply."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=60)
                break
            except ConnectionRefusedError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline
                time.sleep(0.05)
        c = Client(sock)
        assert c.reply().startswith(b"220 ")
        reply = send_message(c, b"hello")
        c.cmd(b"QUIT")
        c.close()
        return reply
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_systemd_socket_activation_accept_no(open_dir: Path) -> None:
    spool = make_spool(open_dir, user="nobody" if os.geteuid() == 0 else None)
    port = free_port()
    argv = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", *serve_argv(spool.table)]
    assert run_until_served(argv, port).startswith(b"250 ")


def test_smap_daemon_is_smapq_serve(open_dir: Path) -> None:
    spool = make_spool(open_dir, user="nobody" if os.geteuid() == 0 else None)
    port = free_port()
    argv = [program("smap"), "-daemon", "-t", str(spool.table)]
    argv += ["--listen", f"127.0.0.1:{port}", "--grace", "1"]
    assert run_until_served(argv, port).startswith(b"250 ")


def test_ipv6(open_dir: Path) -> None:
    spool = make_spool(open_dir, user="nobody" if os.geteuid() == 0 else None)
    port = free_port()
    argv = serve_argv(spool.table, "--listen", f"[::1]:{port}")
    assert run_until_served(argv, port, socket.AF_INET6).startswith(b"250 ")
    [(addr, trace)] = spool.query("SELECT client_addr, trace FROM messages")
    assert addr == "::1"
    assert "(unknown [IPv6:::1])" in trace


@pytest.mark.parametrize(
    ("setup", "args", "code", "words"),
    [
        ("smap: maxbytes lots\n", [], 78, "maxbytes"),
        ("", ["--listen", "127.0.0.1:nope"], 71, "expected ADDR:PORT"),
        ("", ["--listen", "192.0.2.77:25"], 71, "cannot listen on 192.0.2.77:25"),
        ("", [], 71, "nothing to listen on"),
        ("nodb", ["--listen", "127.0.0.1:1"], 75, "run 'smapq init' first"),
    ],
)
@pytest.mark.sqlite_only("start-up errors of the table and listeners; a missing file")
def test_start_up_errors_are_one_line(
    open_dir: Path, setup: str, args: list[str], code: int, words: str
) -> None:
    spool = make_spool(open_dir, user="nobody" if os.geteuid() == 0 else None)
    if setup == "nodb":
        spool.db.unlink()
    else:
        spool.table.write_text(spool.table.read_text() + setup)
    done = subprocess.run(
        [program("smapq"), "-t", str(spool.table), "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_in_use_is_one_line(open_dir: Path) -> None:
    spool = make_spool(open_dir, user="nobody" if os.geteuid() == 0 else None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [program("smapq"), "-t", str(spool.table), "serve", "--listen", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 71
    assert done.stderr.strip() == (
        f"smapq: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_kill_9_under_load_loses_nothing_that_got_250(rig_factory: Callable[..., Rig]) -> None:
    """Eight clients send mail while workers are killed -9 at random moments.  Every
    message that got 250 is stored; every stored message had its final dot sent (a
    message whose commit beat the kill but whose 250 did not is stored without a 250:
    the client will send it again, a duplicate, never a loss)."""
    rig = two_workers(rig_factory)
    stop = threading.Event()
    acked: dict[bytes, str] = {}
    dotted: set[bytes] = set()
    lock = threading.Lock()

    def one(token: bytes) -> None:
        c = Client(rig.server.connect(timeout=30))
        try:
            c.reply()
            c.cmd(b"EHLO load")
            c.cmd(b"MAIL FROM:<a@b.c>")
            c.cmd(b"RCPT TO:<d@e.f>")
            if c.cmd(b"DATA") != R.R354_DATA:
                return
            with lock:
                dotted.add(token)  # before the send: it may arrive though we fail
            c.send(b"token " + token + b"\r\n.\r\n")
            reply = c.reply()
            if reply.startswith(b"250 "):
                with lock:
                    acked[token] = reply.split()[-1].decode()
        finally:
            c.close()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:  # noqa: SIM105
                one(b"%d-%d" % (n, i))
            except OSError:
                pass  # its worker was killed: the next message

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    rng = random.Random(8)
    kills = 0
    try:
        # At least 6 s and 5 kills: on a loaded machine a replaced worker may take a
        # while to come back, so the kills are counted, not the seconds.
        start = time.monotonic()
        while time.monotonic() - start < 6 or (kills < 5 and time.monotonic() - start < 60):
            time.sleep(rng.uniform(0.2, 0.8))
            pids = rig.server.children(running=True)
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills += 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    wait_until(lambda: len(rig.server.children(running=True)) == 2, 60, "workers not back")
    wait_until(lambda: not rig.server.established(), 60, "sessions open")
    rows = rig.rows("SELECT queue_id, body FROM messages", wait=False)
    stored = {bytes(body)[6:-2]: qid for qid, body in rows}
    assert kills >= 5 and len(acked) > 20
    for token, qid in acked.items():
        assert stored.get(token) == qid, f"{token!r} got 250 {qid} but is not stored"
    assert set(stored) <= dotted  # nothing stored whose data was not complete
    assert len(stored) == len(rows)  # and nothing twice


def test_a_killed_writer_takes_its_worker_down_and_both_come_back(
    rig_factory: Callable[..., Rig],
) -> None:
    """The writer process owns the queue; when it dies, its worker answers what it
    cannot commit any more with a temporary failure (never 250), stops, and the
    supervisor starts a new worker with a new writer."""
    rig = rig_factory(kind="serve", serve_args=("--grace", "1"))
    c = rig.client()  # served: the worker and its writer are up
    (worker,) = rig.server.children(running=True)
    (writer,) = [pid for pid in all_pids() if parent(pid) == worker]
    c.cmd(b"EHLO c")
    c.cmd(b"MAIL FROM:<a@b.c>")
    c.cmd(b"RCPT TO:<d@e.f>")
    assert c.cmd(b"DATA") == R.R354_DATA
    os.kill(writer, signal.SIGKILL)
    reply = c.cmd(b"lost writer\r\n.")
    # 451 when the message reached the worker first, 421 when its stop came first
    assert reply in (R.R451_STORE_FAILED, R.R421_SHUTDOWN % rig.hostname()), reply
    wait_until(lambda: set(rig.server.children(running=True)) - {worker}, 60, "no new worker")
    after = rig.client()
    assert send_message(after, b"new writer").startswith(b"250 ")
    after.cmd(b"QUIT")
    c.close()
    rig.opened -= 1  # the first session's events died with its writer (audit, not mail)
    assert rig.rows("SELECT body FROM messages") == [(b"new writer\r\n",)]
