"""Real super-servers for the acceptance tests: openbsd-inetd and systemd-socket-activate.

Each starts the installed ``smap`` per connection on a loopback port, exactly as in
production (the socket is the receiver's fd 0 and 1).  xinetd is not driven here: on
Debian it conflicts with openbsd-inetd (both provide inet-superserver); examples/ has
its entry.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

INETD = "/usr/sbin/inetd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
KINDS = ("inetd", "systemd-socket-activate")


def installed(kind: str) -> bool:
    return os.access(INETD if kind == "inetd" else SOCKET_ACTIVATE, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """True once something listens on 127.0.0.1:port (read from /proc, no connection)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(want) and fields[3] == "0A":
                return True
    return False


class SuperServer:
    """A running super-server that spawns ``argv`` for each connection on ``port``."""

    def __init__(self, kind: str, argv: list[str], workdir: Path, rate: int = 100000) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = workdir / f"{kind}.log"
        if kind == "inetd":
            user = pwd.getpwuid(os.geteuid()).pw_name
            conf = workdir / "inetd.conf"
            # nowait.N: openbsd-inetd stops a service for 10 minutes after 256 starts a
            # minute unless N raises the limit.
            conf.write_text(
                f"127.0.0.1:{self.port} stream tcp nowait.{rate} {user} "
                f"{argv[0]} smap {' '.join(argv[1:])}\n"
            )
            cmd = [INETD, "-i", str(conf)]
        else:
            cmd = [SOCKET_ACTIVATE, "--inetd", "-a", "-l", f"127.0.0.1:{self.port}", *argv]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 10
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{kind} did not start: {self.log.read_text()}")
            time.sleep(0.01)

    def connect(self, timeout: float = 30) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def children(self, running: bool = False) -> list[int]:
        """Pids of the super-server's children (``running``: zombies left out)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == self.proc.pid and not (running and state == "Z"):
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """A raw SMTP client: send bytes, read whole (multi-line) replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")

    def reply(self) -> bytes:
        """One complete reply, CRLFs included; b"" when the server closed."""
        out = b""
        while True:
            line = self.file.readline()
            out += line
            if not line or line[3:4] == b" ":
                return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def eof(self) -> bool:
        """Wait until the receiver closed the connection (it has exited)."""
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()
