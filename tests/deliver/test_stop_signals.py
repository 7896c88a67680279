"""A stop request ends ``smapq deliver --daemon`` / ``smapd`` with exit status 0, however
late the scheduler lets the daemon handle it, whatever dispositions it inherited, and
however many more follow.

The stall: SIGSTOP, the signal, a pause, SIGCONT -- the daemon handles the signal as on
a loaded machine, after the deadline of the wait it interrupted. CPython's
``SimpleQueue.get(timeout)`` then waited forever (see smapq/deliver/inbox.py): the
"daemon did not stop" that CI saw now and then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import program
from tests.deliver.kit import (
    StandIn,
    make_queue,
    peek_log,
    signal_while_stalled,
    spawn,
    standin,
    stop,
    wait_for,
)

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("backend")]

NO_SCAN = "smapd: wakeup 3600\n"
HELD = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}
ROUNDS = 5  # stalled SIGHUPs before the stop: each one could hang the old loop


def _mask(status: str, field: str) -> set[int]:
    for line in status.splitlines():
        if line.startswith(field + ":"):
            bits = int(line.split()[1], 16)
            return {n for n in range(1, 65) if bits >> (n - 1) & 1}
    return set()


def _holds_its_signals(proc: subprocess.Popen[str]) -> bool:
    """The daemon's own code runs and holds (blocks) or handles the stop signals."""
    pid = proc.pid
    try:
        if b"smapd" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False  # still the shell that execs it
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return _mask(status, "SigBlk") >= HELD or _mask(status, "SigCgt") >= HELD


def _in_its_loop(proc: subprocess.Popen[str]) -> bool:
    """The deliverer's handlers are in place and its signals unblocked: the loop runs."""
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
    except OSError:
        return False
    return _mask(status, "SigCgt") >= HELD and not _mask(status, "SigBlk") & HELD


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_request_handled_late_still_stops_the_daemon(
    tmp_path: Path, standin: StandIn, sig: signal.Signals
) -> None:
    """An idle daemon (no mail: no worker thread either, so the main thread takes every
    signal, as it nearly always does when the process runs) sleeps in its wait between
    passes. SIGINT: started as under ``scripts/test`` (a background job of a
    non-interactive sh), with SIGINT ignored."""
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    daemon = q.start_daemon(sigint_ignored=sig == signal.SIGINT)
    try:
        wait_for(lambda: _in_its_loop(daemon), what="the loop running")
        for n in range(1, ROUNDS + 1):
            signal_while_stalled(daemon, signal.SIGHUP)
            wait_for(
                lambda n=n: peek_log(daemon).count("SIGHUP: table re-read") == n,
                what=f"stalled SIGHUP {n} acted on",
            )
        signal_while_stalled(daemon, sig)
    finally:
        code, err = stop(daemon, None)  # one stop request, no second to wake it
    assert code == 0, err
    assert not standin.calls()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_more_stop_requests_until_the_end_leave_exit_status_0(
    tmp_path: Path, standin: StandIn, sig: signal.Signals
) -> None:
    """Signals keep coming while the daemon stops and after its loop has returned: the
    process must not meet its start-up dispositions then (SIGTERM's default kills it,
    Python's SIGINT handler raises KeyboardInterrupt)."""
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    daemon = q.start_daemon()
    try:
        qid = q.add(["a@x.example"])
        wait_for(lambda: q.row(qid).state == "delivered", what="delivery")
        deadline = time.monotonic() + 60
        while daemon.poll() is None and time.monotonic() < deadline:
            daemon.send_signal(sig)
            time.sleep(0.002)
    finally:
        code, err = stop(daemon, None)
    assert code == 0, err
    assert "Traceback" not in err, err
    assert q.states() == {"delivered": 1}


def test_a_stop_anywhere_in_start_up_once_the_signals_are_held(
    tmp_path: Path, standin: StandIn
) -> None:
    """``smapd`` with SIGINT ignored and mail waiting: from the moment it holds its
    signals (at import), a stop request at any later point of start-up or of the first
    claims -- handled late -- ends it with exit 0 and nothing left in ``delivering``."""
    q = make_queue(tmp_path, str(standin.path), NO_SCAN)
    env = {**os.environ, "SMAPQ_TABLE": str(q.spool.table)}
    for n, pause in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)):
        for m in range(3):
            q.add([f"r{n}-{m}@x.example"])
        sig = (signal.SIGINT, signal.SIGTERM)[n % 2]
        daemon = spawn([program("smapd")], sigint_ignored=True, env=env)
        try:
            wait_for(lambda daemon=daemon: _holds_its_signals(daemon), what="signals held")
            time.sleep(pause)
            signal_while_stalled(daemon, sig)
        finally:
            code, err = stop(daemon, None)
        assert code == 0, f"{sig.name} {pause}s after the hold: {err}"
        assert "delivering" not in q.states(), q.states()
