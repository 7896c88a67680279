"""Run one sendmail: argv only, stdin byte-exact, output bounded, a hard deadline.

Purpose: start the delivery program in its own process group with the message as its
stdin, keep at most ``outputmax`` bytes of what it prints (stdout and stderr merged;
the rest is read and dropped so the child never blocks on a full pipe), and kill the
whole group at the deadline or when asked to abort (shutdown).

stdin is an anonymous in-memory file (``memfd_create``; an unlinked temporary file
where that is missing) holding the message, like FWTK smapd handing sendmail the
spool file: the program reads it at its own pace, no pump thread or pipe dance is
needed, a program that exits early cannot block us, and the file can be seeked.

Security: no shell, no preexec hook; the deliverer already runs as smapd's user
(privilege.py), so the child inherits exactly that uid, gid and empty group list.
The memfd is private to this process and the child. A program that leaves a
grandchild holding the output pipe is not waited for once the program has exited.

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
import tempfile
import threading
import time
from collections.abc import Sequence

from smapq.deliver.policy import ChildResult

CHUNK = 65536
TICK = 0.05  # how often a quiet child is checked for abort (and exit, without pidfd)


def message_fd(data: bytes) -> int:
    """A read-only-positioned fd at offset 0 holding ``data``."""
    try:
        fd = os.memfd_create("smapq-message", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        with tempfile.TemporaryFile() as unnamed:
            fd = os.dup(unnamed.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def run(
    argv: Sequence[str],
    data: bytes,
    timeout: float,
    outputmax: int,
    abort: threading.Event | None = None,
    started: list[float] | None = None,
) -> ChildResult:
    """Run ``argv`` with ``data`` on stdin; see the module docstring."""
    stdin = message_fd(data)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
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
    finally:
        os.close(stdin)
    if started is not None:
        started.append(time.time())
    return _supervise(proc, time.monotonic() + timeout, outputmax, abort)


def _supervise(
    proc: subprocess.Popen[bytes],
    deadline: float,
    outputmax: int,
    abort: threading.Event | None,
) -> ChildResult:
    assert proc.stdout is not None
    out = bytearray()
    stdout = proc.stdout.fileno()
    os.set_blocking(stdout, False)
    # A pidfd becomes readable when the program exits: no polling for its exit.
    pidfd = _pidfd(proc.pid)
    sel = selectors.PollSelector()
    sel.register(stdout, selectors.EVENT_READ)
    if pidfd is not None:
        sel.register(pidfd, selectors.EVENT_READ)
    reading = True
    exited = interrupted = False
    try:
        while not exited and (reading or pidfd is not None):
            left = deadline - time.monotonic()
            if left <= 0 or (abort is not None and abort.is_set()):
                interrupted = True
                break
            events = sel.select(min(left, TICK))
            if pidfd is None and proc.poll() is not None:
                exited = True  # a grandchild may still hold the pipe open
            for key, _ in events:
                if key.fd == stdout:
                    if not _take(stdout, out, outputmax):
                        sel.unregister(stdout)
                        reading = False
                else:
                    exited = True
        if exited and reading:
            # What it wrote before exiting is in the pipe now; do not wait for a
            # grandchild that inherited the pipe.
            while _take(stdout, out, outputmax, block=False):
                pass
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
    return _reap(proc, deadline, interrupted, abort, bytes(out))


def _reap(
    proc: subprocess.Popen[bytes],
    deadline: float,
    interrupted: bool,
    abort: threading.Event | None,
    out: bytes,
) -> ChildResult:
    """Collect the exit status (the program may still be finishing without output)."""
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


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _take(fd: int, out: bytearray, outputmax: int, block: bool = True) -> bool:
    """Read one chunk into ``out`` (bounded). False at end of file; when nothing is
    there right now, ``block`` (= keep waiting for more)."""
    try:
        chunk = os.read(fd, CHUNK)
    except BlockingIOError:
        return block
    if not chunk:
        return False
    if len(out) < outputmax:
        out += chunk[: outputmax - len(out)]
    return True


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
