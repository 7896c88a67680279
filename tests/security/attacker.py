"""A stand-in for a compromised smap: as root it does what smap does before its banner
(optionally ``smapq.sandbox.confine``, then chroot and the uid drop), then, as smap's
uid, it tries to reach the given processes and prints what worked as JSON.

Usage: attacker.py UID GID [--jail DIR] [--confine] [--hide-proc] PID...

Every attempt is harmless when it succeeds (signal 0, an attach that is detached at
once, a one-byte read, F_SETOWN on a private pipe without O_ASYNC).
"""

import ctypes
import errno
import json
import os
import sys

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
NR = {"x86_64": {"pidfd_open": 434, "tgkill": 234}, "aarch64": {"pidfd_open": 434, "tgkill": 131}}
F_SETOWN = 8
RLIMIT_NOFILE = 7


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class RLimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]


libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
libc.syscall.restype = ctypes.c_long
libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.prlimit.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]


def outcome(rc: int) -> str:
    if rc != -1:
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def os_outcome(fn, *args) -> str:
    try:
        fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def attach(pid: int) -> str:
    rc = libc.ptrace(PTRACE_ATTACH, pid, None, None)
    result = outcome(rc)
    if rc != -1:  # it worked: let the target go at once
        os.waitpid(pid, 0x40000000)  # __WALL
        libc.ptrace(PTRACE_DETACH, pid, None, None)
    return result


def vm_read(pid: int) -> str:
    buf = ctypes.create_string_buffer(1)
    local = IoVec(ctypes.cast(buf, ctypes.c_void_p), 1)
    remote = IoVec(0x10000, 1)  # unmapped: EFAULT means the permission check passed
    rc = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    result = outcome(rc)
    return "ok" if result in ("ok", "EFAULT") else result


def tgkill(pid: int) -> str:
    return outcome(libc.syscall(NR[os.uname().machine]["tgkill"], pid, pid, 0))


def pidfd(pid: int) -> str:
    rc = libc.syscall(NR[os.uname().machine]["pidfd_open"], pid, 0)
    if rc >= 0:
        os.close(rc)
        return "ok"
    return outcome(-1)


def setown(pid: int) -> str:
    r, w = os.pipe()
    try:
        return os_outcome(__import__("fcntl").fcntl, r, F_SETOWN, pid)
    finally:
        os.close(r)
        os.close(w)


def prlimit(pid: int) -> str:
    old = RLimit()
    return outcome(libc.prlimit(pid, RLIMIT_NOFILE, None, ctypes.byref(old)))


def mem(pid: int) -> str:
    return os_outcome(lambda: os.close(os.open(f"/proc/{pid}/mem", os.O_RDWR)))


ATTACKS = {
    "ptrace": attach,
    "kill": lambda pid: os_outcome(os.kill, pid, 0),
    "tgkill": tgkill,
    "pidfd_open": pidfd,
    "process_vm_readv": vm_read,
    "prlimit": prlimit,
    "f_setown": setown,
    "proc_mem": mem,
}


def main() -> None:
    args = sys.argv[1:]
    uid, gid = int(args.pop(0)), int(args.pop(0))
    jail = None
    confine = hide = False
    pids = []
    while args:
        arg = args.pop(0)
        if arg == "--jail":
            jail = args.pop(0)
        elif arg == "--confine":
            confine = True
        elif arg == "--hide-proc":
            hide = True
        else:
            pids.append(int(arg))
    if confine:
        from smapq import sandbox

        sandbox.confine(hide=hide)
    if jail:
        os.chroot(jail)
        os.chdir("/")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    report = {str(pid): {name: fn(pid) for name, fn in ATTACKS.items()} for pid in pids}
    print(json.dumps(report))


main()
