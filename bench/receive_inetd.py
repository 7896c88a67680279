"""Benchmark: smap spawned per connection by a real super-server (issue 3, "Speed").

Prints, from one run:
  * messages/s with one message per connection through openbsd-inetd (or
    systemd-socket-activate), sequential and with one client per core;
  * the receiver's spawn-to-banner time (exec of the installed ``smap`` on a socketpair
    until the first byte of "220"), median of many runs;
  * its ratio to ``<venv python> -I -S -c "import sqlite3"`` started the same way on the
    same machine, interleaved with it (targets: ratio <= 1.5, >= 25 messages/s per core);
  * the same spawn-to-banner with ``smap: tlscert``/``tlskey`` set (an EC P-256
    self-signed pair): the receiver then loads the ssl module and the key before the
    jail (issue 12: only a receiver with a certificate pays for OpenSSL).
  * the same with an access policy in the table (``smap: domains``, a recipients file of
    1000 entries, five rules: docs/policy.md), interleaved with both.

Run it with the venv's interpreter by absolute path, from a non-editable install
(scripts/venv makes one): an editable install adds a path finder that imports re,
pathlib and enum on every start.

    /path/venv/bin/python bench/receive_inetd.py [--messages 400] [--spawns 60]
        [--server inetd|systemd-socket-activate] [--keep DIR]

As root the receiver chroots into the spool and runs as nobody (production); otherwise
the table turns the jail off.
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchrig import make_certs

BIN = Path(sys.executable).parent
PYTHON = str(Path(sys.executable).absolute())
INETD = "/usr/sbin/inetd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"

BODY = (
    b"From: bench@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
    + b"A line of body text that is about seventy characters long, give or take.\r\n" * 40
)
EHLO = b"EHLO bench.example\r\n"  # EHLO ends a pipelined group (RFC 2920 3.1)
MESSAGE = b"MAIL FROM:<bench@example.org> SIZE=%d\r\nRCPT TO:<sink@example.net>\r\nDATA\r\n" % len(
    BODY
)


def editable_install() -> bool:
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    return any((site / "site-packages").glob("__editable__*smapq*"))


def tls_lines(root: Path) -> str:
    """Table lines for a self-signed EC P-256 certificate and key made under ``root``."""
    cert, key = make_certs(root)
    return f"smap: tlscert {cert}\nsmap: tlskey {key}\n"


def make_spool(root: Path, hostname: str, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = root / "netperm-table"
    lines = [
        f"smap, smapd: directory {root / 'spool'}",
        f"smap: hostname {hostname}",
        "smap: timeout 60",
    ]
    if os.geteuid() == 0:
        lines.append("smap, smapd: userid nobody")
    else:
        lines.append("smap: jail off")
    table.write_text("\n".join(lines) + "\n" + extra)
    table.chmod(0o600)
    subprocess.run(
        [str(BIN / "smapq"), "-t", str(table), "init"], check=True, stdout=subprocess.DEVNULL
    )
    return table


def policy_table(table: Path) -> Path:
    """A second table for the same spool with a typical access policy."""
    rcpts = table.parent / "recipients"
    rcpts.write_text("".join(f"user{i}\n" for i in range(999)) + "sink\n")
    rules = [
        "smap: domains example.net .example.net example.org",
        f"smap: recipients {rcpts}",
        "smap: rule allow 10.0.0.0/8,192.168.0.0/16,fd00::/8 * *",
        "smap: rule deny 192.0.2.0/24,2001:db8::/32 * *",
        "smap: rule noto * * *%*@*",
        "smap: rule noto * *@spam.example *",
        "smap: rule noto * <> *@list.example.net",
    ]
    out = table.parent / "netperm-table-policy"
    out.write_text(table.read_text() + "\n".join(rules) + "\n")
    out.chmod(0o600)
    return out


def free_port() -> int:
    """A random free loopback port below the ephemeral range (which client sockets use)."""
    try:
        lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        lo = 32768
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(10000, lo) if lo > 12000 else rng.randrange(1024, 65536)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def owns_listener(pid: int, port: int) -> bool:
    """True once process ``pid`` itself listens on TCP ``port`` (not someone else)."""
    want = f":{port:04X}"
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want) and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        links = {os.readlink(fd_dir / fd) for fd in os.listdir(fd_dir)}
    except OSError:
        return False
    return bool(inodes & links)


def children(pid: int) -> int:
    """How many children (zombies included) process ``pid`` has."""
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            n += int(stat.rsplit(")", 1)[1].split()[1]) == pid
    return n


def start_server(kind: str, table: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    smap = str(BIN / "smap")
    if kind == "inetd":
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf = workdir / "inetd.conf"
        conf.write_text(
            f"127.0.0.1:{port} stream tcp nowait.1000000 {user} {smap} smap -t {table}\n"
        )
        cmd = [INETD, "-i", str(conf)]
    else:
        cmd = [SOCKET_ACTIVATE, "--inetd", "-a", "-l", f"127.0.0.1:{port}", smap, "-t", str(table)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not owns_listener(proc.pid, port):  # openbsd-inetd is silent when bind fails
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{kind} is not listening on 127.0.0.1:{port}")
        time.sleep(0.01)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.recv(100)  # this probe session costs one banner and no message
                s.sendall(b"QUIT\r\n")
                s.recv(100)
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise
            time.sleep(0.02)


def read_until(sock: socket.socket, marker: bytes, buf: bytearray) -> None:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before {marker!r}: {bytes(buf)!r}")
        buf += chunk


def one_message(port: int) -> float:
    """Connect, send one message (RFC 2920 pipelining groups), QUIT; returns seconds."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        buf = bytearray()
        read_until(s, b"\r\n", buf)
        s.sendall(EHLO)
        read_until(s, b"\r\n250 ", buf)
        s.sendall(MESSAGE)
        read_until(s, b"\r\n354 ", buf)
        s.sendall(BODY + b".\r\nQUIT\r\n")
        read_until(s, b"\r\n221 ", buf)
        if b"\r\n250 2.0.0 Mail accepted" not in buf:
            raise RuntimeError(f"not accepted: {bytes(buf)!r}")
        while s.recv(4096):  # the receiver closes when it has exited
            pass
    return time.perf_counter() - start


def children_cpu(pid: int) -> float:
    """CPU seconds of the super-server's reaped children (the receivers): cutime + cstime."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def throughput(port: int, total: int, clients: int) -> float:
    per = total // clients
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(per):
                one_message(port)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return per * clients / elapsed


def spawn_to_first_byte(argv: list[str], send_quit: bool) -> tuple[float, float]:
    """(seconds to the first byte, CPU seconds of the whole process): the CPU time is
    what a loaded machine (other jobs on the 2 cores) distorts least."""
    a, b = socket.socketpair()
    with a:
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=b.fileno(), stdout=b.fileno(), stderr=subprocess.DEVNULL, env={}
        )
        b.close()
        if send_quit:
            a.recv(1)
            elapsed = time.perf_counter() - start
            a.sendall(b"QUIT\r\n")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if not send_quit:
            elapsed = time.perf_counter() - start
        while a.recv(4096):
            pass
    return elapsed, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--spawns", type=int, default=60)
    ap.add_argument(
        "--clients", type=int, default=0, help="parallel clients (default: 4 per core)"
    )
    ap.add_argument("--server", choices=["inetd", "systemd-socket-activate"], default="inetd")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="smapq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    cores = os.cpu_count() or 1
    clients = args.clients or 4 * cores
    try:
        table = make_spool(work, "bench.smapq.invalid")
        smap = [str(BIN / "smap"), "-t", str(table)]
        smap_policy = [str(BIN / "smap"), "-t", str(policy_table(table))]
        tls_table = make_spool(work / "tls", "bench.smapq.invalid", tls_lines(work))
        smap_tls = [str(BIN / "smap"), "-t", str(tls_table)]
        base = [PYTHON, "-I", "-S", "-c", "import sqlite3"]
        spawn_to_first_byte(smap, True)  # warm the page cache
        spawn_to_first_byte(smap_policy, True)
        spawn_to_first_byte(smap_tls, True)
        runs: dict[str, list[tuple[float, float]]] = {
            "smap": [],
            "policy": [],
            "tls": [],
            "base": [],
        }
        for _ in range(args.spawns):  # interleaved: load changes hit all alike
            runs["smap"].append(spawn_to_first_byte(smap, True))
            runs["policy"].append(spawn_to_first_byte(smap_policy, True))
            runs["tls"].append(spawn_to_first_byte(smap_tls, True))
            runs["base"].append(spawn_to_first_byte(base, False))
        wall = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
        cpu_of = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        banner, with_policy, baseline = wall["smap"], wall["policy"], wall["base"]
        banner_tls = wall["tls"]

        proc, port = start_server(args.server, table, work)
        try:
            one_message(port)
            seq = throughput(port, max(args.messages // 4, 20), 1)
            cpu_before = children_cpu(proc.pid)
            par = throughput(port, args.messages, clients)
            deadline = time.monotonic() + 60  # the last receivers exit and are reaped
            while children(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            cpu = (children_cpu(proc.pid) - cpu_before) / (args.messages // clients * clients)
        finally:
            proc.terminate()
            proc.wait()
        db_path = table.parent / "spool" / "smapq.db"
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    jail = "chroot + nobody" if os.geteuid() == 0 else "jail off (not root)"
    print(f"smapq receive bench: {args.server}, {cores} cores, {jail}, python {PYTHON}")
    if editable_install():
        print("WARNING: editable install: its import finder slows every start; use scripts/venv")
    print(f"  message: {len(BODY)} body bytes, 1 recipient, 1 message per connection")
    print(f"  messages/s, 1 client:           {seq:8.1f}")
    print(
        f"  messages/s, {clients:2d} clients:         {par:8.1f}   per core: {par / cores:.1f}"
        "   (target >= 25)"
    )
    print(
        f"  receiver CPU per message:       {cpu * 1000:8.2f} ms   -> {1 / cpu:.0f} messages/s"
        " per core if the CPU were all smap's"
    )
    print(f"  messages stored:                {stored:8d}")
    print(f"  spawn-to-banner (median of {args.spawns}): {banner * 1000:7.2f} ms")
    print(f"  baseline python -I -S -c 'import sqlite3': {baseline * 1000:7.2f} ms")
    print(f"  ratio:                          {banner / baseline:8.2f}   (target <= 1.5)")
    print(f"  spawn-to-banner with tlscert/tlskey: {banner_tls * 1000:7.2f} ms")
    print(f"  ratio with TLS configured:      {banner_tls / baseline:8.2f}")
    print(f"  spawn-to-banner with a policy:  {with_policy * 1000:8.2f} ms")
    print(f"  ratio with a policy:            {with_policy / baseline:8.2f}   (target <= 1.5)")
    print(
        f"  CPU per spawn (median): smap {cpu_of['smap'] * 1000:.1f} ms, with a policy "
        f"{cpu_of['policy'] * 1000:.1f} ms, baseline {cpu_of['base'] * 1000:.1f} ms; ratios "
        f"{cpu_of['smap'] / cpu_of['base']:.2f} and {cpu_of['policy'] / cpu_of['base']:.2f}"
        " (the whole process: banner, QUIT and exit for smap)"
    )


if __name__ == "__main__":
    main()
