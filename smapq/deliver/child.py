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
    if view:
        sel.register(stdin, selectors.EVENT_WRITE)
    else:
        stdin.close()
    interrupted = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0 or (abort is not None and abort.is_set()):
                interrupted = True
                break
            events = sel.select(min(left, TICK))
            if not events and proc.poll() is not None:
                break  # exited; a grandchild may still hold the pipe open
            for key, _ in events:
                if key.fileobj is stdout:
                    chunk = _read(stdout.fileno())
                    if chunk is None:
                        continue
                    if not chunk:
                        sel.unregister(stdout)
                    elif len(out) < outputmax:
                        out += chunk[: outputmax - len(out)]
                else:
                    view = _write(stdin.fileno(), view)
                    if not view:
                        sel.unregister(stdin)
                        stdin.close()
    finally:
        sel.close()
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
