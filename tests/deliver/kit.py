"""Helpers for the deliverer's tests: a spool with the stand-in sendmail, queue rows.

The queue is filled through the store API (``queries.insert_message``), as the
receiver will; the deliverer runs as the installed ``smapq deliver`` program.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from smapq.store import queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id
from tests.conftest import Spool, make_spool, program

STANDIN = Path(__file__).with_name("standin.py")


class Call:
    """One recorded run of the stand-in sendmail."""

    def __init__(self, meta: dict[str, Any], stdin: bytes) -> None:
        self.argv: list[str] = meta["argv"]
        self.uid: int = meta["uid"]
        self.gid: int = meta["gid"]
        self.groups: list[int] = meta["groups"]
        self.pid: int = meta["pid"]
        self.started: float = meta["started"]
        self.stdin = stdin
        self.ended: float | None = None

    @property
    def recipients(self) -> list[str]:
        return self.argv[self.argv.index("--") + 1 :]


class StandIn:
    """The stand-in sendmail, installed in a world-traversable directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "sendmail"
        self.calls_dir = directory / "calls"
        directory.mkdir(mode=0o755, exist_ok=True)
        self.calls_dir.mkdir()
        self.calls_dir.chmod(0o1777)
        shutil.copy(STANDIN, self.path)
        self.path.chmod(0o755)

    def calls(self) -> list[Call]:
        out = []
        for meta in self.calls_dir.glob("*.json"):
            data = json.loads(meta.read_text())
            call = Call(data, meta.with_suffix(".in").read_bytes())
            done = meta.with_suffix(".done")
            if done.exists():
                call.ended = float(done.read_text())
            out.append(call)
        return sorted(out, key=lambda c: (c.started, c.pid))

    def max_overlap(self) -> int:
        """The most stand-ins that were running at the same moment."""
        edges = []
        for c in self.calls():
            assert c.ended is not None
            edges += [(c.started, 1), (c.ended, -1)]
        running = peak = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):
            running += step
            peak = max(peak, running)
        return peak

    def hold(self, local: str = "") -> None:
        """Make runs wait before exiting: all of them, or those for ``local@...``."""
        (self.dir / (f"hold-{local}" if local else "hold")).touch()

    def release(self, local: str = "") -> None:
        (self.dir / (f"hold-{local}" if local else "hold")).unlink(missing_ok=True)


@pytest.fixture
def standin() -> Iterator[StandIn]:
    directory = Path(tempfile.mkdtemp(prefix="smapq-sendmail-"))
    directory.chmod(0o755)
    yield StandIn(directory)
    shutil.rmtree(directory, ignore_errors=True)


class Queue:
    """A spool whose smapd runs the stand-in; helpers to queue and inspect messages."""

    def __init__(self, spool: Spool, sendmail: str) -> None:
        self.spool = spool
        self.sendmail = sendmail
        self.engine: Engine = make_engine(spool.target)

    def add(
        self,
        rcpts: list[str],
        body: bytes = b"Subject: test\n\nhello\n",
        sender: str = "sender@example.org",
        trace: str = "",
        received_at: float | None = None,
    ) -> str:
        queue_id = new_queue_id()
        message = {
            "queue_id": queue_id,
            "protocol": "ESMTP",
            "mail_from": sender,
            "size": len(body),
            "trace": trace,
            "body": body,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "received_at": received_at,
            "next_attempt_at": received_at,
        }
        with self.engine.begin() as conn:
            queries.insert_message(conn, message, rcpts)
        return queue_id

    def row(self, queue_id: str) -> Any:
        with self.engine.begin() as conn:
            return queries.message_by_queue_id(conn, queue_id)

    def recipients(self, queue_id: str) -> list[Any]:
        with self.engine.begin() as conn:
            row = queries.message_by_queue_id(conn, queue_id)
            assert row is not None
            return queries.recipients_of(conn, row.id)

    def events(self, queue_id: str) -> list[str]:
        with self.engine.begin() as conn:
            return [e.kind for e in queries.events_of(conn, queue_id)]

    def states(self) -> dict[str, int]:
        with self.engine.begin() as conn:
            return queries.count_by_state(conn)

    def make_due(self, queue_id: str) -> None:
        """Pretend the retry time has come (instead of waiting minutes)."""
        with self.engine.begin() as conn:
            conn.execute(
                text("UPDATE messages SET next_attempt_at = 0 WHERE queue_id = :q"),
                {"q": queue_id},
            )

    def deliver(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.spool.smapq("deliver", "--once", *args, check=check)

    def start_daemon(self, *args: str, sigint_ignored: bool = False) -> subprocess.Popen[str]:
        """``smapq deliver --daemon``; ``sigint_ignored``: started with SIGINT (and
        SIGQUIT) ignored, as a non-interactive shell starts a background job."""
        return spawn(
            [program("smapq"), "-t", str(self.spool.table), "deliver", "--daemon", *args],
            sigint_ignored=sigint_ignored,
        )


def spawn(
    argv: list[str], sigint_ignored: bool = False, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """A daemon with its log on a pipe; the shell's ``trap`` (then ``exec``) hands it
    SIGINT ignored, the disposition ``cmd &`` gives in a non-interactive sh."""
    if sigint_ignored:
        argv = ["/bin/sh", "-c", 'trap "" INT QUIT; exec "$0" "$@"', *argv]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**(env or os.environ), "PYTHONFAULTHANDLER": "1"},
    )


def signal_while_stalled(proc: subprocess.Popen[str], sig: int, stall: float = 0.1) -> None:
    """Send ``sig`` while the daemon is stopped, and let it go on ``stall`` seconds
    later: it handles the signal as a process the scheduler left waiting on a loaded
    machine does, after the deadline of whatever wait the signal interrupted."""
    proc.send_signal(signal.SIGSTOP)
    try:
        proc.send_signal(sig)
        time.sleep(stall)
    finally:
        proc.send_signal(signal.SIGCONT)


def make_queue(root: Path, sendmail: str, extra: str = "", user: str | None = None) -> Queue:
    """A queue on the running test's backend (see tests/conftest.py)."""
    spool = make_spool(root, extra=f"smapd: sendmail {sendmail}\n{extra}", user=user)
    return Queue(spool, sendmail)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll until ``predicate()`` is truthy; a generous bound, never a timing assert."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what or predicate}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM) -> tuple[int, str]:
    """Signal a daemon (``None``: it was signalled already) and collect its exit status
    and log; a hang dumps its threads."""
    if sig is not None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        sigs = "".join(line + "\n" for line in status.splitlines() if line.startswith("Sig"))
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            blk = [ln for ln in (task / "status").read_text().splitlines() if "SigBlk" in ln]
            sigs += f"task {task.name} {blk}\n"
        proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack
        _, err = proc.communicate(timeout=60)
        raise AssertionError(f"daemon did not stop:\n{sigs}{err}") from None
    return proc.returncode, err


_LOGS: dict[int, str] = {}


def peek_log(proc: subprocess.Popen[str]) -> str:
    """What a daemon has logged on stderr so far (reads without blocking)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        chunk = b""
    _LOGS[proc.pid] = _LOGS.get(proc.pid, "") + chunk.decode()
    return _LOGS[proc.pid]
