"""Run one sendmail: argv only, stdin fed byte-exact, output bounded, a hard deadline.

Purpose: start the delivery program in its own process group, write the message to
its stdin, keep at most ``outputmax`` bytes of what it prints (stdout and stderr
merged, the rest is read and dropped so the child never blocks on a full pipe), and
kill the whole group at the deadline or when asked to abort (shutdown).

Security: no shell, no preexec hook; the deliverer already runs as smapd's user
(see privilege.py), so the child inherits exactly that uid, gid and empty group list.
A program that leaves a grandchild holding the output pipe is not waited for once
the program itself has exited.

Diagnostics: an exec failure (missing program, permission, bad interpreter) is a
``ChildResult`` with ``exec_error``, never an exception.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Sequence

from smapq.deliver.policy import ChildResult

CHUNK = 65536
TICK = 0.05  # how often a quiet child is checked for exit/abort/deadline


def run(
    argv: Sequence[str],
    data: bytes,
    timeout: float,
    outputmax: int,
    abort: threading.Event | None = None,
    started: list[float] | None = None,
) -> ChildResult:
    """Run ``argv`` with ``data`` on stdin; see the module docstring."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            process_group=0,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOEXEC:
            reason = "not an executable program"
        return ChildResult(exec_error=f"cannot execute {argv[0]}: {reason}")
    if started is not None:
        started.append(time.time())
    return _supervise(proc, data, time.monotonic() + timeout, outputmax, abort)


def _supervise(
    proc: subprocess.Popen[bytes],
    data: bytes,
    deadline: float,
    outputmax: int,
    abort: threading.Event | None,
) -> ChildResult:
    assert proc.stdin is not None and proc.stdout is not None
    out = bytearray()
    view = memoryview(data)
    sel = selectors.DefaultSelector()
    stdin, stdout = proc.stdin, proc.stdout
    os.set_blocking(stdin.fileno(), False)
    os.set_blocking(stdout.fileno(), False)
    sel.register(stdout, selectors.EVENT_READ)
    # A pidfd becomes readable when the program exits: no polling for its exit.
    pidfd = _pidfd(proc.pid)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    if view:
        sel.register(stdin, selectors.EVENT_WRITE)
    else:
        stdin.close()
    interrupted = exited = False
    try:
        while not exited and (pidfd is not None or stdout in _files(sel) or stdin in _files(sel)):
            left = deadline - time.monotonic()
            if left <= 0 or (abort is not None and abort.is_set()):
                interrupted = True
                break
            events = sel.select(min(left, TICK))
            if not events and proc.poll() is not None:
                exited = True  # (no pidfd) exited; a grandchild may hold the pipe open
            for key, _ in events:
                if key.fileobj is stdout:
                    if not _take(stdout.fileno(), out, outputmax):
                        sel.unregister(stdout)
                elif key.fileobj is stdin:
                    view = _write(stdin.fileno(), view)
                    if not view:
                        sel.unregister(stdin)
                        stdin.close()
                else:
                    exited = True
        if exited and stdout in _files(sel):
            # Whatever it wrote before exiting is in the pipe now; do not wait for a
            # grandchild that inherited the pipe.
            while _take(stdout.fileno(), out, outputmax, block=False):
                pass
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        with contextlib.suppress(OSError):
            stdin.close()
        stdout.close()
    return _reap(proc, deadline, interrupted, abort, bytes(out))


def _reap(
    proc: subprocess.Popen[bytes],
    deadline: float,
    interrupted: bool,
    abort: threading.Event | None,
    out: bytes,
) -> ChildResult:
    """Wait for the program (its output is closed, it may still be finishing)."""
    while not interrupted:
        try:
            proc.wait(timeout=max(0.0, min(deadline - time.monotonic(), TICK)))
            break
        except subprocess.TimeoutExpired:
            interrupted = time.monotonic() >= deadline or (abort is not None and abort.is_set())
    if interrupted and proc.poll() is None:
        _kill_group(proc.pid)  # deadline or abort: the whole group goes, not just the leader
        proc.wait()
        if time.monotonic() >= deadline:
            return ChildResult(timed_out=True, output=out)
        return ChildResult(signal=signal.SIGKILL, output=out)
    code = proc.returncode
    if code < 0:
        return ChildResult(signal=-code, output=out)
    return ChildResult(status=code, output=out)


def _files(sel: selectors.BaseSelector) -> list[object]:
    return [key.fileobj for key in sel.get_map().values()]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _take(fd: int, out: bytearray, outputmax: int, block: bool = True) -> bool:
    """Read one chunk into ``out`` (bounded); False at end of file or, if not
    ``block``, when nothing more is there right now."""
    chunk = _read(fd)
    if chunk is None:
        return block
    if not chunk:
        return False
    if len(out) < outputmax:
        out += chunk[: outputmax - len(out)]
    return True


def _read(fd: int) -> bytes | None:
    """Up to CHUNK bytes; b"" at end of file; None if nothing is there after all."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None


def _write(fd: int, view: memoryview) -> memoryview:
    try:
        n = os.write(fd, view[:CHUNK])
    except BlockingIOError:
        return view
    except (BrokenPipeError, ConnectionResetError):
        # The program stopped reading (it failed early, or takes no input): its exit
        # status says what happened.
        return view[:0]
    return view[n:]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
