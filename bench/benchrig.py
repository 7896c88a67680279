"""Rig parts for the intake benchmarks and the load test: spools, servers, process trees.

Purpose: what bench/intake.py and bench/load.py share -- a spool made by the installed
``smapq init`` (smap jailed as nobody when run as root, as in production), smap under a
real openbsd-inetd, ``smapq serve``, ``smapq deliver --daemon``, and the /proc readings
both need: the CPU time of a server's whole process tree (reaped children included) and
the sockets that tree listens on.  Importable, so a test can drive the same rig.

Security: run as root to get the production jail (chroot + nobody); the temporary
directories are 0755 so the dropped uid can reach the spool and the stand-in sendmail.
Nothing outside the temporary directory is written.

Diagnostics: ordinary failures (a server that does not listen, a command that fails)
raise ``RigError`` with one line saying what and why; callers print it and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the super-server driver lives with the acceptance tests
    sys.path.insert(0, str(ROOT))

from tests.receive.superserver import SuperServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent
SMAPQ = str(BIN / "smapq")
SMAP = str(BIN / "smap")
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
_POLL = 0.01

__all__ = [
    "Deliverer",
    "InetdServer",
    "RigError",
    "ServeServer",
    "Spool",
    "add_rig_options",
    "free_port",
    "make_certs",
    "make_spool",
    "probe",
    "serve_available",
    "tree_cpu",
    "tree_listeners",
    "tree_pids",
]


class RigError(Exception):
    """An ordinary failure of the rig; the message is one line for the operator."""


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition()`` until true; RigError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RigError(f"{what} (waited {timeout:.0f} s)")
        time.sleep(_POLL)


# --- /proc readings ---------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0]); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (zombies included), from one pass over /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of ``root``'s tree: utime + stime + cutime + cstime of every member.

    Read before and after a run, the difference counts the children that were born,
    exited and were reaped in between (they are in their parent's cutime/cstime).
    """
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields:
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


def _hex_addr(text: str) -> str:
    """/proc/net address (host byte order words) to its printable form."""
    raw = bytes.fromhex(text)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    return "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"


def _bound_sockets() -> dict[int, str]:
    """Inode -> "proto addr:port" of every listening TCP and every bound UDP socket."""
    found: dict[int, str] = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            listening = fields[3] == "0A" if proto.startswith("tcp") else True
            if listening:
                addr, port = fields[1].split(":")
                found[int(fields[9])] = f"{proto[:3]} {_hex_addr(addr)}:{int(port, 16)}"
    return found


def _socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(int(link[8:-1]))
    return out


def tree_listeners(root: int) -> set[str]:
    """What ``root``'s process tree listens on, e.g. {"tcp 127.0.0.1:25999"}."""
    bound = _bound_sockets()
    out: set[str] = set()
    for pid in tree_pids(root):
        out.update(bound[i] for i in _socket_inodes(pid) if i in bound)
    return out


def probe(port: int, host: str = "127.0.0.1", timeout: float = 30) -> bytes:
    """One session that stores nothing: read the banner, QUIT; returns the banner."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        banner = s.recv(4096)
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
            s.recv(4096)
    if not banner.startswith(b"220"):
        raise RigError(f"{host}:{port} greeted with {banner[:80]!r}")
    return banner


def wait_serving(root: int, port: int, alive: Callable[[], bool], what: str) -> None:
    """Wait until ``root``'s tree listens on ``port`` and a probe gets a 220."""
    deadline = time.monotonic() + START_TIMEOUT
    want = f":{port}"
    while not any(s.endswith(want) for s in tree_listeners(root)):
        if not alive():
            raise RigError(f"{what} exited before it listened on port {port}")
        if time.monotonic() > deadline:
            raise RigError(f"{what} is not listening on port {port}")
        time.sleep(_POLL)
    while True:
        try:
            probe(port)
            return
        except (OSError, RigError) as exc:
            if time.monotonic() > deadline:
                raise RigError(f"{what} does not greet on port {port}: {exc}") from None
            time.sleep(0.05)


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the leader; SIGKILL its whole process group if it outlives ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
    proc.wait()


# --- spools -----------------------------------------------------------------------------


class Spool:
    """A spool made by ``smapq init`` from a table of the rig's choosing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.table = root / "netperm-table"
        self.directory = root / "spool"
        self.db = self.directory / "smapq.db"

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=60)) as db:
            return list(db.execute(sql, args))

    def count(self) -> int:
        """Messages stored (any state)."""
        return int(str(self.query("SELECT count(*) FROM messages")[0][0]))

    def sessions(self) -> int:
        """Distinct SMTP sessions that stored a message."""
        return int(str(self.query("SELECT count(DISTINCT session_id) FROM messages")[0][0]))

    def states(self) -> dict[str, int]:
        return {
            str(s): int(n)  # type: ignore[call-overload]
            for s, n in self.query("SELECT state, count(*) FROM messages GROUP BY state")
        }

    def queue_ids(self) -> set[str]:
        return {str(q) for (q,) in self.query("SELECT queue_id FROM messages")}


def make_spool(root: Path, extra: str = "", sendmail: str | None = None) -> Spool:
    """Write a table for a spool under ``root`` (0755) and run ``smapq init`` on it.

    As root smap and smapd run as nobody and smap chroots (production); otherwise the
    jail is off, as on a developer's box.  ``extra`` is appended to the table.
    """
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    spool = Spool(root)
    lines = [
        f"smap, smapd: directory {spool.directory}",
        f"smapd: baddir {root / 'bad'}",
        "smap: hostname bench.smapq.invalid",
    ]
    if os.geteuid() == 0:
        lines.append("smap, smapd: userid nobody")
    else:
        lines.append("smap: jail off")
    if sendmail:
        lines.append(f"smapd: sendmail {sendmail}")
    spool.table.write_text("\n".join(lines) + "\n" + extra + ("\n" if extra else ""))
    spool.table.chmod(0o600)
    done = subprocess.run(
        [SMAPQ, "-t", str(spool.table), "init"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RigError(f"smapq init failed ({done.returncode}): {why}")
    return spool


def make_certs(directory: Path, name: str = "bench.smapq.invalid") -> tuple[Path, Path]:
    """A self-signed EC P-256 certificate and its key (0600) under ``directory``.

    One pair serves every TLS target of a bench (smap, serve, Postfix), so the
    handshakes compared use the same certificate and key type.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    argv += ["-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key)]
    done = subprocess.run([*argv, "-out", str(cert)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RigError(f"openssl req failed ({done.returncode}): {why}")
    key.chmod(0o600)
    cert.chmod(0o644)
    return cert, key


def standin_sendmail(directory: Path) -> str:
    """A sendmail that reads the message and succeeds, in a 0755 directory."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    path = directory / "sendmail"
    path.write_text("#!/bin/sh\nexec cat >/dev/null\n")
    path.chmod(0o755)
    return str(path)


# --- servers ----------------------------------------------------------------------------


class InetdServer:
    """smap under a real openbsd-inetd (``nowait.RATE``) on a random loopback port."""

    name = "inetd"

    def __init__(self, spool: Spool, workdir: Path, rate: int = 1_000_000) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.server = SuperServer("inetd", [SMAP, "-t", str(spool.table)], workdir, rate)
        except (RuntimeError, AssertionError, OSError) as exc:
            raise RigError(f"openbsd-inetd: {str(exc).splitlines()[0]}") from None
        assert self.server.proc is not None
        self.pid = self.server.proc.pid
        self.port = self.server.port
        probe(self.port)

    def idle(self, timeout: float = STOP_TIMEOUT) -> None:
        """Wait until no smap runs: each commits its session's last events after EOF."""
        wait_for(lambda: not self.server.children(running=True), timeout, "smap still runs")

    def stop(self) -> None:
        with contextlib.suppress(RigError):
            self.idle(10)
        try:
            self.server.stop()
        except AssertionError as exc:
            raise RigError(f"openbsd-inetd: {exc}") from None


def serve_available() -> bool:
    """Does this install have ``smapq serve``?"""
    done = subprocess.run([SMAPQ, "serve", "--help"], capture_output=True, check=False)
    return done.returncode == 0


class ServeServer:
    """``smapq -t TABLE serve --listen 127.0.0.1:PORT [ARGS]``, or a command template.

    ``command`` replaces the default argv; ``{table}``, ``{port}`` and ``{bin}`` in its
    words are filled in (so another listener can stand in while serve is being built).
    """

    name = "serve"

    def __init__(
        self,
        spool: Spool,
        workdir: Path,
        args: list[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "serve.log"
        last = ""
        for _ in range(4):  # a port taken between our check and the bind: try another
            self.port = free_port()
            fill = {"table": str(spool.table), "port": str(self.port), "bin": str(BIN)}
            if command:
                argv = [w.format(**fill) for w in command]
            else:
                listen = f"127.0.0.1:{self.port}"
                argv = [SMAPQ, "-t", str(spool.table), "serve", "--listen", listen]
            argv += args or []
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
                )
            self.pid = self.proc.pid
            try:
                wait_serving(self.pid, self.port, lambda: self.proc.poll() is None, "serve")
                return
            except RigError as exc:
                last = str(exc)
                self.stop()
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise RigError(f"{last}; {' '.join(argv)}: {tail[0]}")

    def idle(self, timeout: float = STOP_TIMEOUT) -> None:
        """Sessions end inside the workers; nothing to wait for."""

    def stop(self) -> None:
        """SIGTERM (serve drains its sessions), then SIGKILL the group after a deadline."""
        if self.proc.returncode is None:
            _stop_group(self.proc)
            _kill_group(self.proc, signal.SIGKILL)  # anything the leader left behind


class Deliverer:
    """``smapq deliver --daemon`` on a spool, logging to ``workdir/deliver.log``."""

    def __init__(self, spool: Spool, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "deliver.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [SMAPQ, "-t", str(spool.table), "deliver", "--daemon"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        time.sleep(0.5)  # it opens the database and drops privileges; fail early if not
        if self.proc.poll() is not None:
            raise RigError(f"smapq deliver --daemon exited {self.proc.returncode}: {self.tail()}")

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        lines = [ln for ln in lines if not ln.startswith("(Background on this error")]
        return lines[-1] if lines else "(no output)"

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM and wait; the exit status (0 after a clean stop)."""
        _stop_group(self.proc)
        return self.proc.returncode


def add_rig_options(group: argparse._ActionsContainer) -> None:
    """The options both benches take to shape the smap/serve rig."""
    group.add_argument(
        "--serve-args", default="", help="extra serve arguments, e.g. '--workers 2'"
    )
    group.add_argument(
        "--serve-command",
        type=shlex.split,
        default=None,
        help="another listener instead of smapq serve; {table} {port} {bin} are filled in",
    )
    group.add_argument(
        "--table-extra",
        action="append",
        default=[],
        metavar="LINE",
        help="netperm-table line for the smap/serve spools (repeatable)",
    )
    group.add_argument(
        "--inetd-rate", type=int, default=1_000_000, help="openbsd-inetd nowait.N (starts/min)"
    )
    group.add_argument("--keep", type=Path, help="work in DIR and keep it")
