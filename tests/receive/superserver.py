"""Real super-servers for the acceptance tests: openbsd-inetd and systemd-socket-activate.

Each starts the installed ``smap`` per connection on a loopback port, exactly as in
production (the socket is the receiver's fd 0 and 1).  xinetd is not driven here: on
Debian it conflicts with openbsd-inetd (both provide inet-superserver); examples/ has
its entry.

Robust under load and beside other test runs: every wait is for a condition (our
super-server owns the listening socket, a receiver has exited) with a generous bound,
never a fixed sleep.  Ports are picked at random below the kernel's ephemeral range, so
no client socket or ``bind(0)`` elsewhere can take one between our check and the
super-server's bind; a port someone else took anyway is detected (the listener is not
our process's) and another one is tried.  ``stop`` kills the receivers still running
and the super-server, and waits until they are gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

INETD = "/usr/sbin/inetd"
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"
KINDS = ("inetd", "systemd-socket-activate")
SERVE = "serve"  # smapq serve: not a super-server, but driven the same way

START_TIMEOUT = 60.0  # seconds for a super-server to listen (a loaded CI box is slow)
EXIT_TIMEOUT = 60.0  # seconds for processes to go away after a signal
START_ATTEMPTS = 4  # ports tried before giving up
_POLL = 0.01
_rng = random.SystemRandom()  # pytest-randomly reseeds `random` per test; ports must differ


def installed(kind: str) -> bool:
    if kind == SERVE:
        return True
    return os.access(INETD if kind == "inetd" else SOCKET_ACTIVATE, os.X_OK)


def _port_pool() -> range:
    """Ports the kernel never hands out by itself: below (else above) the ephemeral range."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    if lo > 12000:
        return range(10000, lo)
    if hi < 63000:
        return range(hi + 1, 65536)
    return range(1024, 65536)  # no room outside: ownership checks still catch a clash


def free_port() -> int:
    """A loopback port nothing is bound to right now, picked at random."""
    pool = _port_pool()
    for _ in range(1000):
        port = _rng.choice(pool)
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port")


def tcp_sockets(port: int) -> list[tuple[str, int]]:
    """(state, inode) of every TCP socket whose local port is ``port``, from /proc/net
    (state 0A: listening; inode 0: orphaned after close, e.g. in FIN_WAIT2)."""
    want = f":{port:04X}"
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(want):
                found.append((fields[3], int(fields[9])))
    return found


def listeners(port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` (any address)."""
    return {inode for state, inode in tcp_sockets(port) if state == "0A"}


def proc_status(pid: int) -> dict[str, list[str]]:
    """/proc/PID/status as field -> words."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.split()
    return out


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` has open."""
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of ``pid``, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition()`` until true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} (waited {timeout:.0f} s)"
        time.sleep(_POLL)


_live: set[SuperServer] = set()


@atexit.register
def _stop_all() -> None:  # a run cut short must not leave super-servers behind
    for server in list(_live):
        server.stop()


class SuperServer:
    """A running super-server that spawns ``argv`` for each connection on ``port``."""

    def __init__(self, kind: str, argv: list[str], workdir: Path, rate: int = 100000) -> None:
        self.kind = kind
        self.argv = argv
        self.rate = rate
        self.workdir = workdir
        self.log = workdir / f"{kind}.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        problems = []
        for _ in range(START_ATTEMPTS):
            problem = self._start(free_port())
            if problem is None:
                return
            problems.append(problem)
        raise RuntimeError(f"{kind} did not start: " + "; ".join(problems))

    def _command(self) -> list[str]:
        argv = self.argv
        if self.kind == SERVE:  # argv: smapq -t TABLE serve [options]
            return [*argv, "--listen", f"127.0.0.1:{self.port}"]
        if self.kind == "inetd":
            user = pwd.getpwuid(os.geteuid()).pw_name
            conf = self.workdir / "inetd.conf"
            # nowait.N: openbsd-inetd stops a service for 10 minutes after 256 starts a
            # minute unless N raises the limit.
            conf.write_text(
                f"127.0.0.1:{self.port} stream tcp nowait.{self.rate} {user} "
                f"{argv[0]} smap {' '.join(argv[1:])}\n"
            )
            return [INETD, "-i", str(conf)]
        return [SOCKET_ACTIVATE, "--inetd", "-a", "-l", f"127.0.0.1:{self.port}", *argv]

    def _start(self, port: int) -> str | None:
        """Start on ``port``; None once our process listens there, else why not."""
        self.port = port
        with self.log.open("ab") as log:
            log.write(f"--- port {port}\n".encode())
            log.flush()
            self.proc = proc = subprocess.Popen(
                self._command(), stdout=log, stderr=log, start_new_session=True
            )
        _live.add(self)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            found = listeners(port)
            # smapq serve listens before it forks: ready once a worker runs too
            if found & socket_inodes(proc.pid) and (self.kind != SERVE or self.children()):
                return None
            # openbsd-inetd keeps running (and says nothing without syslog) when its
            # bind fails; a listener that is not ours means someone else took the port.
            gone = proc.poll() is not None
            if gone or found or time.monotonic() > deadline:
                self.stop()
                why = "exited" if gone else "port taken" if found else "not listening"
                return f"port {port}: {why}: {self.log.read_text(errors='replace')[-500:]}"
            time.sleep(_POLL)

    def connect(self, timeout: float = 120, rcvbuf: int = 0) -> socket.socket:
        """A client socket (``rcvbuf``: its receive buffer, set before the handshake)."""
        sock = socket.socket()
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def established(self) -> int:
        """Connections to our port that the server side still holds open (not the
        listener, not orphaned)."""
        return sum(1 for state, inode in tcp_sockets(self.port) if state != "0A" and inode)

    def children(self, running: bool = False) -> list[int]:
        """Pids of the super-server's children (``running``: zombies left out); for
        smapq serve, its workers."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            st = _stat(int(entry))
            if st and st[1] == self.proc.pid and not (running and st[0] == "Z"):
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Kill the receivers still running, then the super-server; wait for all of them.

        The receivers go first, while the super-server is there to reap them: openbsd-
        inetd puts each in its own session, so they would outlive it otherwise.
        """
        _live.discard(self)
        proc = self.proc
        if proc is None:
            return
        if self.kind == SERVE:  # it stops its workers itself
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is None:
            for _ in range(3):  # a connection accepted meanwhile may spawn one more
                pids = self.children(running=True)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                wait_until(
                    lambda: not self.children(running=True), EXIT_TIMEOUT, "receivers live on"
                )
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


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
