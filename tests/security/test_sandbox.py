"""``smapq.sandbox`` directly: the filter's tables, what a confined process can and cannot
do, and the real receiver serving a whole SMTP session while confined."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import subprocess
import sys
import termios
from collections.abc import Callable
from pathlib import Path

import pytest

from smapq import sandbox
from tests.conftest import open_dir, program, root_only
from tests.receive.conftest import Rig, spool_for_receiver
from tests.receive.superserver import SuperServer, wait_until

__all__ = ["open_dir"]

HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
CONFINED = Path(__file__).with_name("confined.py")


def kernel_numbers(header: Path) -> dict[str, int]:
    out = {}
    for line in header.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[2].isdigit():
            name = parts[1].removeprefix("__NR3264_").removeprefix("__NR_")
            out[name] = int(parts[2])
    return out


@pytest.mark.parametrize("name", sorted(sandbox.MACHINES))
def test_syscall_numbers_match_the_kernel_headers(name: str) -> None:
    header = HEADERS[name]
    if not header.exists():
        pytest.skip(f"{header} is not installed (linux-libc-dev)")
    known = kernel_numbers(header)
    m = sandbox.MACHINES[name]
    table = {**m.deny, **{k: v[0] for k, v in m.rules.items()}}
    assert table == {k: known[k] for k in table}


def in_confined_child(probe: Callable[[int], dict[str, str]]) -> dict[str, str]:
    """Run ``probe(parent_pid)`` in a confined child; its result through a pipe."""
    parent = os.getpid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            sandbox.confine()
            out = repr(probe(parent))
        except BaseException as exc:
            out = repr({"error": repr(exc)})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return eval(text)


def attempt(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def _probe(parent: int) -> dict[str, str]:
    r, _w = os.pipe()
    status = Path("/proc/self/status").read_text()
    x32 = "skip"
    if os.uname().machine == "x86_64":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(sandbox.X32_BIT | 39)  # getpid through the x32 ABI
        x32 = "ok" if rc != -1 else errno.errorcode[ctypes.get_errno()]
    child = subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, text=True)
    return {
        "signal self": attempt(lambda: os.kill(os.getpid(), 0)),
        "signal parent": attempt(lambda: os.kill(parent, 0)),
        "signal group": attempt(lambda: os.kill(0, 0)),
        "signal all": attempt(lambda: os.kill(-1, 0)),
        "raise": attempt(lambda: signal.raise_signal(signal.SIGWINCH)),
        "getrlimit": attempt(lambda: resource.getrlimit(resource.RLIMIT_NOFILE)),
        "prlimit self": attempt(lambda: resource.prlimit(0, resource.RLIMIT_NOFILE)),
        "prlimit parent": attempt(lambda: resource.prlimit(parent, resource.RLIMIT_NOFILE)),
        "setpriority parent": attempt(lambda: os.setpriority(os.PRIO_PROCESS, parent, 1)),
        "affinity parent": attempt(lambda: os.sched_setaffinity(parent, {0})),
        "F_GETFL": attempt(lambda: fcntl.fcntl(r, fcntl.F_GETFL)),
        "F_SETFL": attempt(lambda: fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)),
        "F_SETOWN": attempt(lambda: fcntl.fcntl(r, fcntl.F_SETOWN, parent)),
        "F_SETSIG": attempt(lambda: fcntl.fcntl(r, 10, signal.SIGKILL)),
        "FIONREAD": attempt(lambda: fcntl.ioctl(r, termios.FIONREAD, b"\0\0\0\0")),
        "FIOSETOWN": attempt(lambda: fcntl.ioctl(r, 0x8901, parent.to_bytes(4, "little"))),
        "pidfd_open": attempt(lambda: os.close(os.pidfd_open(parent))),
        "x32": x32,
        "no_new_privs": status.split("NoNewPrivs:")[1].split()[0],
        "seccomp": status.split("Seccomp:")[1].split()[0],
        "seccomp after execve": child.stdout.split("Seccomp:")[1].split()[0],
    }


def test_a_confined_process_keeps_to_itself() -> None:
    got = in_confined_child(_probe)
    assert got == {
        "signal self": "ok",
        "signal parent": "EPERM",
        "signal group": "EPERM",
        "signal all": "EPERM",
        "raise": "ok",
        "getrlimit": "ok",
        "prlimit self": "ok",
        "prlimit parent": "EPERM",
        "setpriority parent": "EPERM",
        "affinity parent": "EPERM",
        "F_GETFL": "ok",
        "F_SETFL": "ok",
        "F_SETOWN": "EPERM",
        "F_SETSIG": "EPERM",
        "FIONREAD": "ok",
        "FIOSETOWN": "EPERM",
        "pidfd_open": "EPERM",
        "x32": "EPERM" if os.uname().machine == "x86_64" else "skip",
        "no_new_privs": "1",
        "seccomp": "2",
        "seccomp after execve": "2",
    }


def test_unknown_machine_is_refused_not_run_unconfined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "MACHINES", {})
    with pytest.raises(sandbox.SandboxError, match="no seccomp filter for this machine"):
        sandbox.confine()


def test_every_jump_of_the_filter_stays_inside_it() -> None:
    for m in sandbox.MACHINES.values():
        prog = sandbox.program(m, 4242)
        assert prog[-1] == (0x06, 0, 0, sandbox.RET_EPERM)
        for pc, (op, jt, jf, _k) in enumerate(prog):
            if op & 0x07 == 0x05:  # BPF_JMP
                assert pc + 1 + max(jt, jf) < len(prog)


@root_only
@pytest.mark.privileged
@pytest.mark.integration
@pytest.mark.parametrize("jail", ["on", "off"])
@pytest.mark.usefixtures("backend")
def test_the_receiver_serves_a_whole_session_confined(open_dir: Path, jail: str) -> None:
    spool = spool_for_receiver(open_dir, f"smap: jail {jail}\n")
    hide = ["--hide-proc"] if jail == "off" else []
    # A script with the venv's interpreter as its #! line: inetd names argv[0] "smap",
    # and the interpreter finds its venv from its own path, not from that name.
    wrapper = open_dir / "confined"
    wrapper.write_text(f"#!{sys.executable}\n" + CONFINED.read_text())
    wrapper.chmod(0o755)
    argv = [str(wrapper), *hide, program("smap"), "-t", str(spool.table)]
    rig = Rig(spool, SuperServer("inetd", argv, open_dir))
    try:
        _session(rig, jail)
    finally:
        for c in rig.clients:
            c.close()
        rig.server.stop()


def _session(rig: Rig, jail: str) -> None:
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    (pid,) = rig.server.children(running=True)
    status = Path(f"/proc/{pid}/status").read_text()
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
    assert c.cmd(b"MAIL FROM:<a@client.example>").startswith(b"250 ")
    assert c.cmd(b"RCPT TO:<b@example.org>").startswith(b"250 ")
    assert c.cmd(b"DATA").startswith(b"354 ")
    assert c.cmd(b"Subject: confined\r\n\r\nhello\r\n.").startswith(b"250 ")
    assert c.cmd(b"QUIT").startswith(b"221 ")
    wait_until(lambda: not rig.server.children(running=True), 60, "receiver exit")
    assert rig.rows("SELECT count(*) FROM messages") == [(1,)]
    if jail == "off":
        assert Path("/proc/self/status").exists()  # the host's /proc was not touched
