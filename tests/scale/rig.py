"""Many hosts on one machine: network namespaces, a private PostgreSQL, receivers, deliverers.

Purpose: the rig of issue 9 item 8 and of bench/scale.py. Each "host" is a network
namespace joined to a bridge in the root namespace by a veth pair; a private PostgreSQL
(its own initdb and pg_ctl, its own port) listens on the bridge address, so every
receiver (``smapq serve``) and deliverer (``smapq deliver --daemon``) reaches the queue
over a real network path, as from another machine. Clients in the root namespace speak
SMTP to the receivers over the bridge. The stand-in sendmail appends one line per
delivery (the Message-ID and the deliverer's pid) to a ledger opened with O_APPEND,
so exactly-once delivery is counted from what was really delivered.

Where namespaces cannot be made (not root, no ``ip netns``), every process runs in the
root namespace on loopback ports and ``Net.isolated`` is False: callers say so.

Security: needs root for namespaces and to run PostgreSQL as ``postgres``. The shared
server at 127.0.0.1:5432 is never touched: the private one has its own data directory,
port and socket directory. Every namespace, link and process the rig made is removed
by ``close()`` (also at interpreter exit), and leftovers of a dead run are swept at start.

Diagnostics: failures raise ``RigError`` with one line saying what, and where a log is.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.pgprivate import PG_BIN, PrivateServer
from tests.receive.superserver import free_port

BIN = Path(sys.executable).parent
SMAPQ = str(BIN / "smapq")
PGBIN = PG_BIN
PREFIX = "sqs"  # names of our namespaces and links: sqs<tag>h<i>, sqs<tag>v<i>, sqs<tag>b
START_TIMEOUT = 60.0
_POLL = 0.02
FIGURES: list[str] = []  # what the scenarios measured, for the terminal summary


class RigError(Exception):
    """An ordinary failure of the rig; the message is one line."""


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RigError(f"{what} (waited {timeout:.0f} s)")
        time.sleep(_POLL)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if check and done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RigError(f"{' '.join(argv[:4])} failed ({done.returncode}): {why}")
    return done


def world_dir(prefix: str) -> Path:
    """A fresh 0755 directory under /tmp that dropped uids (nobody, postgres) can reach."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# --- network namespaces -------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers() -> None:
    """Remove namespaces and links of rig runs whose process is gone (a killed test)."""
    listing = _run(["ip", "netns", "list"], check=False).stdout
    links = _run(["ip", "-o", "link", "show"], check=False).stdout
    dead: set[str] = set()
    for text in (listing, links):
        for tag in re.findall(rf"\b{PREFIX}([0-9a-f]+)[hvb]", text):
            if not _alive(int(tag, 16)):
                dead.add(tag)
    for tag in dead:
        for name in re.findall(rf"\b({PREFIX}{tag}h\d+)\b", listing):
            _kill_netns_pids(name)
            _run(["ip", "netns", "del", name], check=False)
        for name in set(re.findall(rf"\b({PREFIX}{tag}[vb]\d*)\b", links)):
            _run(["ip", "link", "del", name], check=False)


def _kill_netns_pids(name: str) -> None:
    pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class Net:
    """A bridge in the root namespace and one namespace per host, each on a veth pair.

    Host i has address ``host_addr(i)``; the bridge (where PostgreSQL listens) has
    ``gateway``. Without namespaces everything is 127.0.0.1 and ``isolated`` is False.
    """

    def __init__(self, hosts: int, want: bool = True) -> None:
        self.hosts = hosts
        self.tag = f"{os.getpid():x}"
        self.names = [f"{PREFIX}{self.tag}h{i}" for i in range(hosts)]
        self.bridge = f"{PREFIX}{self.tag}b"
        self.isolated = False
        self.why_not = ""
        self.gateway = "127.0.0.1"
        self._subnet = ""
        self._made: list[str] = []
        if want:
            try:
                self._up()
                self.isolated = True
            except (RigError, OSError) as exc:
                self.why_not = str(exc)
                self.close()
                self._subnet = ""
                self.gateway = "127.0.0.1"
        else:
            self.why_not = "namespaces not wanted"
        atexit.register(self.close)

    def _pick_subnet(self) -> str:
        used = _run(["ip", "-o", "-4", "addr", "show"], check=False).stdout
        for third in [os.getpid() % 200 + 20, *range(20, 220)]:
            candidate = f"10.213.{third}"
            if f" {candidate}." not in used:
                return candidate
        raise RigError("no free 10.213.x.0/24 subnet")

    def _up(self) -> None:
        if os.geteuid() != 0:
            raise RigError("network namespaces need root")
        if shutil.which("ip") is None:
            raise RigError("no ip(8)")
        sweep_leftovers()
        self._subnet = self._pick_subnet()
        self.gateway = f"{self._subnet}.1"
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._made.append(self.bridge)
        _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for i, name in enumerate(self.names):
            outer, inner = f"{PREFIX}{self.tag}v{i}", f"{PREFIX}{self.tag}p{i}"
            _run(["ip", "netns", "add", name])
            self._made.append(name)
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
            self._made.append(outer)
            _run(["ip", "link", "set", inner, "netns", name])
            _run(["ip", "link", "set", outer, "master", self.bridge])
            _run(["ip", "link", "set", outer, "up"])
            inside = ["ip", "netns", "exec", name, "ip"]
            _run([*inside, "addr", "add", f"{self.host_addr(i)}/24", "dev", inner])
            _run([*inside, "link", "set", inner, "up"])
            _run([*inside, "link", "set", "lo", "up"])

    def host_addr(self, i: int) -> str:
        return f"{self._subnet}.{10 + i}" if self._subnet else "127.0.0.1"

    def prefix(self, i: int) -> list[str]:
        """The argv prefix that runs a command on host i."""
        return ["ip", "netns", "exec", self.names[i]] if self.isolated else []

    def close(self) -> None:
        for name in reversed(self._made):
            if name.startswith(f"{PREFIX}{self.tag}h"):
                _kill_netns_pids(name)
                _run(["ip", "netns", "del", name], check=False)
            else:
                _run(["ip", "link", "del", name], check=False)
        self._made.clear()


# --- a private PostgreSQL -----------------------------------------------------------------


class PrivatePostgres(PrivateServer):
    """The rig's server: tests/pgprivate.py's, listening on the bridge address.

    ``settings`` go to postgresql.conf. Trust authentication for the rig's subnet and
    loopback only. The database ``smapq`` is created empty.
    """

    def __init__(self, workdir: Path, listen: str, settings: dict[str, str] | None = None) -> None:
        if os.geteuid() != 0:
            raise RigError("a private PostgreSQL needs root (it runs as postgres)")
        if not (PGBIN / "initdb").exists():
            raise RigError(f"no {PGBIN}/initdb (postgresql-15)")
        self.workdir = workdir
        try:
            super().__init__(
                # PostgreSQL's own shared_buffers, not pgprivate's small one: the crash
                # scenario counts on dirty pages staying in memory.
                {"max_connections": "200", "shared_buffers": "128MB", **(settings or {})},
                listen=listen,
                directory=workdir,
                hba=(f"host all all {listen}/24 trust", "host all all 127.0.0.1/32 trust"),
            )
        except subprocess.CalledProcessError as exc:
            why = (exc.stderr or "").strip().splitlines() or ["no message"]
            raise RigError(
                f"{' '.join(exc.cmd[:3])} failed ({exc.returncode}): {why[-1]}"
            ) from exc
        atexit.register(self.close)
        self.admin("CREATE DATABASE smapq")

    def child(self, title: str) -> int:
        """The pid of the server process titled ``postgres: TITLE`` (e.g. walwriter)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
                ppid = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
                if int(ppid) == postmaster and cmd.strip() == f"postgres: {title}":
                    return int(entry)
        raise RigError(f"no 'postgres: {title}' process under {postmaster}")

    def crash_unflushed(self, pause: float) -> None:
        """A crash that loses every commit not flushed by its own backend.

        The processes that flush WAL on others' behalf (the WAL writer; the background
        writer and the checkpointer, which flush WAL before writing a dirty page) are
        frozen for ``pause`` seconds, so commits made with ``synchronous_commit = off``
        stay in the WAL buffers (shared memory) while their clients are told they
        committed; then an immediate stop (no checkpoint, no WAL write) and SIGKILL to
        the frozen ones. Only commits that flushed WAL themselves (synchronous_commit
        on) survive, as in a power cut. Needs autovacuum off (its ring buffer flushes).
        """
        frozen = [self.child(t) for t in ("walwriter", "background writer", "checkpointer")]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(pause)
            stopper = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(PGBIN / "pg_ctl"), "-D",
                 str(self.data), "-m", "immediate", "-w", "-t", "60", "stop"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(0.2)  # the postmaster has its SIGQUIT: nothing writes WAL any more
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if stopper.wait(90) != 0:
            raise RigError(f"pg_ctl stop -m immediate failed; see {self.log}")

    def libpq(self, db: str = "smapq") -> str:
        return self.libpq_url(db)

    def url(self, dbname: str = "smapq") -> str:
        """The SQLAlchemy URL the netperm-tables name."""
        return super().url(dbname)

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.libpq("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def close(self) -> None:
        """Stop it (a crash: nothing to keep); the rig removes its directory."""
        if self.data.exists() and self.running():
            with contextlib.suppress(subprocess.CalledProcessError):
                self.stop("immediate")


# --- the queue, read by the rig -------------------------------------------------------------


class Queue:
    """Read access to the queue database for assertions (either backend)."""

    def __init__(self, pg: PrivatePostgres | None, sqlite_path: Path | None) -> None:
        self.pg = pg
        self.sqlite_path = sqlite_path

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        if self.pg is not None:
            import psycopg

            with psycopg.connect(self.pg.libpq(), connect_timeout=10) as conn:
                return list(conn.execute(sql.replace("?", "%s"), args))
        with contextlib.closing(
            sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True, timeout=60)
        ) as db:
            return list(db.execute(sql, args))

    def states(self) -> dict[str, int]:
        return {
            str(s): int(str(n))
            for s, n in self.query("SELECT state, count(*) FROM messages GROUP BY state")
        }

    def in_flight(self, pid: int) -> int:
        """Rows a deliverer with this pid holds (claimed, outcome not committed)."""
        rows = self.query(
            "SELECT count(*) FROM messages WHERE state = 'delivering' AND lease_owner LIKE ?",
            f"%:{pid}:%",
        )
        return int(str(rows[0][0]))

    def message_ids(self) -> dict[str, list[tuple[str, str]]]:
        """Message-ID -> [(queue id, state)], read from the stored bodies (a message the
        client had to send again after a lost reply may be stored twice)."""
        out: dict[str, list[tuple[str, str]]] = {}
        for qid, state, body in self.query("SELECT queue_id, state, body FROM messages"):
            mid = message_id(bytes(body))  # type: ignore[call-overload]
            out.setdefault(mid, []).append((str(qid), str(state)))
        return out


def message_id(body: bytes) -> str:
    for line in body.split(b"\n", 40)[:40]:
        if line[:11].lower() == b"message-id:":
            return line[11:].strip().decode()
    return ""


# --- hosts -------------------------------------------------------------------------------------

STANDIN = """#!/bin/sh
# Reads the message, appends "<Message-ID> <deliverer pid>" to the ledger (O_APPEND: one
# write per delivery, never interleaved), exits 0. dash builtins only: no fork.
id=
while IFS= read -r line; do
  case $line in
    [Mm]essage-[Ii][Dd]:*) [ -n "$id" ] || id=${line#*:} ;;
  esac
done
printf '%s %s\\n' "$id" "$PPID" >> LEDGER
"""


def standin(directory: Path) -> tuple[str, Path]:
    """The recording sendmail and its ledger, both reachable by nobody."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)
    ledger = directory / "ledger"
    ledger.touch()
    ledger.chmod(0o666)
    exe = directory / "sendmail"
    exe.write_text(STANDIN.replace("LEDGER", str(ledger)))
    exe.chmod(0o755)
    return str(exe), ledger


def read_ledger(path: Path) -> list[tuple[str, int]]:
    out = []
    for line in path.read_bytes().decode(errors="replace").split("\n"):
        if not line.strip():
            continue
        mid, _, pid = line.strip().rpartition(" ")
        out.append((mid.strip(), int(pid) if pid.isdigit() else 0))
    return out


def host_table(root: Path, database: str, sendmail: str, extra: str = "") -> Path:
    """A netperm-table for one host, and ``smapq init`` of its spool."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    lines = [
        f"smap, smapd: directory {root / 'spool'}",
        f"smapd: baddir {root / 'bad'}",
        f"smap: hostname {root.name}.scale.invalid",
        f"smapd: sendmail {sendmail}",
        "smapd: lease 5",
    ]
    if database:
        lines.append(f"smap, smapd: database {database}")
    if os.geteuid() == 0:
        lines.append("smap, smapd: userid nobody")
    else:
        lines.append("smap: jail off")
    table = root / "netperm-table"
    table.write_text("\n".join(lines) + "\n" + extra)
    table.chmod(0o600)
    _run([SMAPQ, "-t", str(table), "init"])
    return table


class Proc:
    """A long-lived program on one host, its own process group, output to a log."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """The host dies: SIGKILL to the whole process group (sendmail children too)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return self.proc.returncode

    def tail(self, n: int = 3) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:]) if lines else "(no output)"


def greet(host: str, port: int, timeout: float = 10) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as s:
        banner = s.recv(4096)
        with contextlib.suppress(OSError):
            s.sendall(b"QUIT\r\n")
            s.recv(4096)
    return banner


class Cluster:
    """Receivers and deliverers on hosts of ``net`` sharing one queue.

    ``backend`` "postgres": a private PostgreSQL on the bridge, every host its own
    spool directory and table. "sqlite": one spool (one database file) for all hosts:
    namespaces do not isolate files, so SQLite still works across them (a baseline).
    """

    def __init__(
        self,
        workdir: Path,
        backend: str,
        receivers: int = 2,
        deliverers: int = 4,
        namespaces: bool = True,
        pg_settings: dict[str, str] | None = None,
        serve_args: list[str] | None = None,
        table_extra: str = "",
    ) -> None:
        self.workdir = workdir
        self.backend = backend
        self.net = Net(receivers + deliverers, want=namespaces)
        self.sendmail, self.ledger = standin(workdir / "sendmail")
        self.pg: PrivatePostgres | None = None
        self.receivers: list[tuple[Proc, str, int]] = []
        self.deliverers: list[Proc] = []
        self.tables: list[Path] = []
        try:
            if backend == "postgres":
                self.pg = PrivatePostgres(workdir / "pg", self.net.gateway, pg_settings)
                database = self.pg.url()
                for i in range(receivers + deliverers):
                    self.tables.append(
                        host_table(workdir / f"host{i}", database, self.sendmail, table_extra)
                    )
                # init leaves a database URL alone; the schema is the operator's step.
                _run([SMAPQ, "-t", str(self.tables[0]), "db", "upgrade"])
                self.queue = Queue(self.pg, None)
            else:
                table = host_table(workdir / "shared", "", self.sendmail, table_extra)
                self.tables = [table] * (receivers + deliverers)
                self.queue = Queue(None, workdir / "shared" / "spool" / "smapq.db")
            for i in range(receivers):
                addr = self.net.host_addr(i)
                port = 2525 if self.net.isolated else free_port()
                argv = [
                    *self.net.prefix(i),
                    SMAPQ,
                    "-t",
                    str(self.tables[i]),
                    "serve",
                    "--listen",
                    f"{addr}:{port}",
                    *(serve_args or []),
                ]
                proc = Proc(argv, workdir / f"serve{i}.log")
                self.receivers.append((proc, addr, port))
            for proc, addr, port in self.receivers:
                self._wait_greeting(proc, addr, port)
            for j in range(deliverers):
                self.deliverers.append(self._deliverer(receivers + j))
        except BaseException:
            self.close()
            raise

    def _deliverer(self, i: int) -> Proc:
        argv = [*self.net.prefix(i), SMAPQ, "-t", str(self.tables[i]), "deliver", "--daemon"]
        return Proc(argv, self.workdir / f"deliver{i}.log")

    def restart_deliverer(self, j: int) -> Proc:
        proc = self.deliverers[j]
        proc.start()
        return proc

    def _wait_greeting(self, proc: Proc, addr: str, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not proc.running():
                raise RigError(f"serve on {addr}:{port} exited: {proc.tail()}")
            with contextlib.suppress(OSError):
                if greet(addr, port).startswith(b"220"):
                    return
            if time.monotonic() > deadline:
                raise RigError(f"serve on {addr}:{port} does not greet: {proc.tail()}")
            time.sleep(0.05)

    def endpoints(self) -> list[tuple[str, int]]:
        return [(addr, port) for _, addr, port in self.receivers]

    def close(self) -> None:
        for proc in self.deliverers:
            proc.stop()
        for proc, _, _ in self.receivers:
            proc.stop()
        if self.pg is not None:
            self.pg.close()
        self.net.close()


# --- SMTP clients ------------------------------------------------------------------------------


class Outcome:
    """What the clients saw, shared by their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # Message-ID -> queue id from the 250
        self.acked_twice: list[str] = []  # acked again after a lost reply
        self.uncertain: set[str] = set()  # '.' sent, no reply: maybe stored
        self.temp: dict[str, int] = {}  # "421 at banner" etc. -> count
        self.perm: list[str] = []  # 5xx: never expected
        self.acked_during: dict[str, int] = {}  # label of a window -> 250s seen in it
        self.window = ""

    def note_temp(self, what: str) -> None:
        with self.lock:
            self.temp[what] = self.temp.get(what, 0) + 1


def make_message(mid: str, n: int) -> bytes:
    return (
        f"From: client{n % 50}@clients.example\r\nTo: rcpt{n}@dest.example\r\n"
        f"Subject: scale {n}\r\nMessage-ID: {mid}\r\n\r\nbody of {n}\r\n"
    ).encode()


class _Reply(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class _Session:
    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.file = self.sock.makefile("rb")
        code, text = self.reply()
        if code != 220:
            raise _Reply(code, f"banner {text}")
        self.sock.sendall(b"EHLO client.scale.invalid\r\n")
        code, text = self.reply()
        if code != 250:
            raise _Reply(code, f"EHLO {text}")

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline(2048)
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode(errors="replace").rstrip())
            if line[3:4] != b"-":
                return int(line[:3]), lines[-1]

    def send(self, sender: str, rcpt: str, data: bytes) -> tuple[int, str, bool]:
        """One transaction, pipelined; (code, text, whether the final dot was sent)."""
        self.sock.sendall(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
        replies = [self.reply() for _ in range(3)]
        for code, text in replies[:2]:
            if code != 250:
                if replies[2][0] == 354:  # DATA went through without recipients: abort it
                    self.sock.sendall(b".\r\n")
                    self.reply()
                return code, text, False
        if replies[2][0] != 354:
            return replies[2][0], replies[2][1], False
        self.sock.sendall(data + b".\r\n")
        code, text = self.reply()
        return code, text, True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        with contextlib.suppress(OSError):
            self.sock.close()


def send_all(
    endpoints: list[tuple[str, int]],
    ids: list[str],
    outcome: Outcome,
    threads: int = 8,
    per_session: int = 25,
    deadline: float = 600,
    stop: threading.Event | None = None,
) -> None:
    """Send every Message-ID until it gets a 250 (4xx and lost connections: try again).

    Each thread works a share of the ids, alternating receivers, up to ``per_session``
    messages on one connection, like an MTA with a queue.
    """
    end = time.monotonic() + deadline

    def worker(k: int) -> None:
        todo = list(reversed(ids[k::threads]))
        turn = k
        while todo and time.monotonic() < end:
            if stop is not None and stop.is_set():
                return
            host, port = endpoints[turn % len(endpoints)]
            turn += 1
            try:
                session = _Session(host, port)
            except _Reply as exc:
                outcome.note_temp(f"{exc.code} at greeting")
                time.sleep(0.1)
                continue
            except OSError:
                outcome.note_temp("connect failed")
                time.sleep(0.1)
                continue
            try:
                for _ in range(per_session):
                    if not todo:
                        break
                    mid = todo[-1]
                    n = int(mid.split("-")[-1].split("@")[0])
                    dot_sent = False
                    try:
                        code, text, dot_sent = session.send(
                            f"c{k}@clients.example",
                            f"rcpt{n}@dest.example",
                            make_message(mid, n),
                        )
                    except OSError:
                        if dot_sent:
                            with outcome.lock:
                                outcome.uncertain.add(mid)
                        outcome.note_temp("connection lost")
                        raise
                    if code == 250 and dot_sent:
                        qid = text.rsplit(" ", 1)[-1]
                        with outcome.lock:
                            if mid in outcome.acked:
                                outcome.acked_twice.append(mid)
                            outcome.acked[mid] = qid
                            w = outcome.window
                            outcome.acked_during[w] = outcome.acked_during.get(w, 0) + 1
                        todo.pop()
                    elif 400 <= code < 500:
                        outcome.note_temp(f"{code} after {'DATA' if dot_sent else 'envelope'}")
                        if code == 421:
                            break
                        time.sleep(0.05)
                    else:
                        with outcome.lock:
                            outcome.perm.append(f"{mid}: {code} {text}")
                        todo.pop()
            except OSError:
                time.sleep(0.1)
            finally:
                session.close()

    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def ids_for(run: str, n: int) -> list[str]:
    return [f"<{run}-{i}@scale.invalid>" for i in range(n)]


def wait_delivered(
    cluster: Cluster, want: set[str], timeout: float, progress: Callable[[], None] | None = None
) -> dict[str, int]:
    """Wait until every Message-ID in ``want`` is in the ledger; counts per Message-ID."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while True:
        counts = {}
        for mid, _ in read_ledger(cluster.ledger):
            counts[mid] = counts.get(mid, 0) + 1
        if want <= counts.keys():
            return counts
        if progress is not None:
            progress()
        if time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def iter_kill_times(rng_seed: int, count: int, span: float) -> Iterator[float]:
    """``count`` random moments in [0, span), sorted: when to kill a deliverer."""
    import random

    rng = random.Random(rng_seed)
    yield from sorted(rng.uniform(0.1 * span, span) for _ in range(count))
