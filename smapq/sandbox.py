"""Keep a process away from every other process of its uid: the smap side of the boundary.

Purpose: smap parses hostile network input as an unprivileged uid. With the seed's
table (``smap, smapd: userid 5``) smapd and every sendmail it starts run as that uid
too, and the kernel lets a uid ptrace, signal and read or write the memory of its own
processes. ``confine()`` is called by the receiver after the table is read and before
the jail: from then on this process and everything it forks or executes cannot reach
any other process, whatever uid it runs as:

  * ``PR_SET_NO_NEW_PRIVS``: no execve can gain privileges (setuid/setgid bits and
    file capabilities are inert), and the filter below cannot be dropped;
  * a seccomp filter (kept across fork and execve) answers EPERM to ptrace,
    process_vm_readv/writev, process_madvise/mrelease, kcmp, pidfd_open/getfd/
    send_signal, rt_(tg)sigqueueinfo, perf_event_open, get_robust_list,
    migrate_pages, move_pages and io_uring; kill/tkill/tgkill unless aimed at this
    process itself; prlimit64, sched_set{affinity,scheduler,param,attr}, setpriority
    and ioprio_set unless aimed at the caller (0); fcntl F_SETOWN/F_SETOWN_EX/F_SETSIG
    and ioctl FIOSETOWN/SIOCSPGRP (which would have the kernel send a chosen signal,
    SIGKILL included, to a chosen pid); and every system call made through another
    ABI (i386, x32), which the lists above would not cover;
  * ``hide_proc``, for ``smap: jail off`` as root: a private mount namespace with an
    empty read-only /proc, because /proc/PID/mem of a same-uid process is writable
    without ptrace(2) and a file path cannot be filtered by seccomp. (Jailed, /proc is
    outside the chroot.)

``nondumpable()`` is the deliverer's half: smapd itself then cannot be ptraced or its
/proc files opened by its uid, even when started as that uid rather than by root.

Security: this module trusts nothing but the kernel. The filter is built here from
fixed tables (x86_64 and little-endian aarch64); on another machine ``confine`` raises
``SandboxError`` rather than run unconfined. A uid of its own for smapd (see
docs/SECURITY.md) makes the kernel's uid checks do the same job for processes that
smap did not start.

Standards: seccomp(2), prctl(2) PR_SET_NO_NEW_PRIVS/PR_SET_DUMPABLE, mount_namespaces(7).

Diagnostics: ``SandboxError`` (exit 77) with the failing step and errno text.

Lean: imported by the inetd receiver on every connection. ``_ctypes`` directly: the
``ctypes`` package costs ~2 ms to import, this module ~0.4 ms.
"""

from __future__ import annotations

import _ctypes
import os

from smapq.errors import PrivilegeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    _Simple = _ctypes._SimpleCData[Any]
else:
    _Simple = _ctypes._SimpleCData

PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REC, MS_PRIVATE = 0x4000, 0x40000

# Classic BPF, as seccomp(2) runs it: opcodes, and the seccomp_data layout.
_LD_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_RET = 0x06  # BPF_RET | BPF_K
_NR, _ARCH = 0, 4


def _arg_low(n: int) -> int:
    """Offset of the low 32 bits of argument n (little-endian machines only)."""
    return 16 + 8 * n


RET_ALLOW = 0x7FFF0000
RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM

X32_BIT = 0x40000000

# Argument rules: how a listed call may still be made.
SELF = "self"  # argument 0 is this process's own pid
ZERO = "zero"  # argument N is 0 (the calling process)
NOT_IN = "not-in"  # argument 1 is none of the listed commands

F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15
FIOSETOWN, SIOCSPGRP = 0x8901, 0x8902


class Machine:
    """System call numbers of one ABI and the seccomp arch value that names it."""

    __slots__ = ("arch", "deny", "name", "rules", "x32")

    def __init__(
        self,
        name: str,
        arch: int,
        deny: dict[str, int],
        rules: dict[str, tuple[int, str, int, tuple[int, ...]]],
        x32: bool,
    ) -> None:
        self.name = name
        self.arch = arch
        self.deny = deny
        self.rules = rules
        self.x32 = x32


_X86_64 = Machine(
    "x86_64",
    0xC000003E,
    {
        "ptrace": 101,
        "rt_sigqueueinfo": 129,
        "get_robust_list": 274,
        "migrate_pages": 256,
        "move_pages": 279,
        "rt_tgsigqueueinfo": 297,
        "perf_event_open": 298,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "kcmp": 312,
        "pidfd_send_signal": 424,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "process_mrelease": 448,
    },
    {
        # name: (number, rule, argument, values)
        "kill": (62, SELF, 0, ()),
        "tkill": (200, SELF, 0, ()),
        "tgkill": (234, SELF, 0, ()),
        "prlimit64": (302, ZERO, 0, ()),
        "sched_setparam": (142, ZERO, 0, ()),
        "sched_setscheduler": (144, ZERO, 0, ()),
        "sched_setaffinity": (203, ZERO, 0, ()),
        "sched_setattr": (314, ZERO, 0, ()),
        "setpriority": (141, ZERO, 1, ()),
        "ioprio_set": (251, ZERO, 1, ()),
        "fcntl": (72, NOT_IN, 1, (F_SETOWN, F_SETSIG, F_SETOWN_EX)),
        "ioctl": (16, NOT_IN, 1, (FIOSETOWN, SIOCSPGRP)),
    },
    x32=True,
)

_AARCH64 = Machine(
    "aarch64",
    0xC00000B7,
    {
        "ptrace": 117,
        "rt_sigqueueinfo": 138,
        "get_robust_list": 100,
        "migrate_pages": 238,
        "move_pages": 239,
        "rt_tgsigqueueinfo": 240,
        "perf_event_open": 241,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "kcmp": 272,
        "pidfd_send_signal": 424,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "pidfd_open": 434,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "process_mrelease": 448,
    },
    {
        "kill": (129, SELF, 0, ()),
        "tkill": (130, SELF, 0, ()),
        "tgkill": (131, SELF, 0, ()),
        "prlimit64": (261, ZERO, 0, ()),
        "sched_setparam": (118, ZERO, 0, ()),
        "sched_setscheduler": (119, ZERO, 0, ()),
        "sched_setaffinity": (122, ZERO, 0, ()),
        "sched_setattr": (274, ZERO, 0, ()),
        "setpriority": (140, ZERO, 1, ()),
        "ioprio_set": (30, ZERO, 1, ()),
        "fcntl": (25, NOT_IN, 1, (F_SETOWN, F_SETSIG, F_SETOWN_EX)),
        "ioctl": (29, NOT_IN, 1, (FIOSETOWN, SIOCSPGRP)),
    },
    x32=False,
)

MACHINES = {"x86_64": _X86_64, "aarch64": _AARCH64}


class SandboxError(PrivilegeError):
    """The process cannot be confined as asked; it must not go on."""


def machine() -> Machine | None:
    """The system call table of this machine, or None where there is none."""
    return MACHINES.get(os.uname().machine)


# --- a tiny BPF assembler -------------------------------------------------------------
# An instruction is (code, jt, jf, k); jt/jf may name a label, resolved to the forward
# offset the kernel wants (jumps go forward only, at most 255 instructions).

DENY, ALLOW = "deny", "allow"


def program(m: Machine, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter for machine ``m`` in a process whose pid is ``pid``."""
    code: list[tuple[int, object, object, int]] = []
    labels: dict[str, int] = {}
    code.append((_LD_ABS, 0, 0, _ARCH))
    code.append((_JEQ, 0, DENY, m.arch))
    code.append((_LD_ABS, 0, 0, _NR))
    if m.x32:
        code.append((_JGE, DENY, 0, X32_BIT))
    for nr in sorted(m.deny.values()):
        code.append((_JEQ, DENY, 0, nr))
    for name, (nr, _rule, _arg, _values) in sorted(m.rules.items()):
        code.append((_JEQ, name, 0, nr))
    code.append((_RET, 0, 0, RET_ALLOW))
    for name, (_nr, rule, arg, values) in sorted(m.rules.items()):
        labels[name] = len(code)
        code.append((_LD_ABS, 0, 0, _arg_low(arg)))
        if rule == SELF:
            code.append((_JEQ, ALLOW, DENY, pid))
        elif rule == ZERO:
            code.append((_JEQ, ALLOW, DENY, 0))
        else:
            for value in values:
                code.append((_JEQ, DENY, 0, value))
            code.append((_RET, 0, 0, RET_ALLOW))
    labels[ALLOW] = len(code)
    code.append((_RET, 0, 0, RET_ALLOW))
    labels[DENY] = len(code)
    code.append((_RET, 0, 0, RET_EPERM))
    out = []
    for pc, (op, jt, jf, k) in enumerate(code):
        out.append((op, _offset(jt, pc, labels), _offset(jf, pc, labels), k))
    return out


def _offset(target: object, pc: int, labels: dict[str, int]) -> int:
    if isinstance(target, int):
        return target
    jump = labels[str(target)] - pc - 1
    if not 0 <= jump <= 255:
        raise SandboxError(f"seccomp filter: jump of {jump} instructions")
    return jump


def _encode(insns: list[tuple[int, int, int, int]]) -> bytes:
    return b"".join(
        op.to_bytes(2, "little") + bytes((jt, jf)) + k.to_bytes(4, "little")
        for op, jt, jf, k in insns
    )


# --- calling libc without the ctypes package ------------------------------------------


class _ULong(_Simple):
    _type_ = "L"


class _Int(_Simple):
    _type_ = "i"


class _CharP(_Simple):
    _type_ = "z"


class _Func(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _Int


class _Libc:
    """The already loaded C library (dlopen(NULL)): works in a chroot too."""

    def __init__(self) -> None:
        self._handle = _ctypes.dlopen(None, 0)  # type: ignore[arg-type]


_LIBC: _Libc | None = None


def _call(name: str, *args: object) -> None:
    """Call libc ``name``; raise SandboxError with errno text when it returns -1."""
    global _LIBC  # noqa: PLW0603  (one handle per process, made on first use)
    if _LIBC is None:
        _LIBC = _Libc()
    func = _Func((name, _LIBC))  # type: ignore[arg-type]
    _ctypes.set_errno(0)
    if func(*args) == -1:
        err = _ctypes.get_errno()
        raise SandboxError(f"{name}: {os.strerror(err)}")


def _address(buffer: _CharP) -> int:
    """The address a ``char *`` instance points at."""
    return int(_ULong.from_address(_ctypes.addressof(buffer)).value)


def _prctl(option: int, arg2: object = 0, arg3: object = 0) -> None:
    args = [a if not isinstance(a, int) else _ULong(a) for a in (arg2, arg3)]
    _call("prctl", _ULong(option), *args, _ULong(0), _ULong(0))


def no_new_privs() -> None:
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def nondumpable() -> None:
    """No ptrace and no /proc/PID/{mem,environ,fd} for this process's own uid.

    The kernel sets this on a uid change and clears it on execve, so call it after
    the privilege drop (and know that programs this process executes are dumpable).
    """
    _prctl(PR_SET_DUMPABLE, 0)


def install_filter(m: Machine, pid: int | None = None) -> None:
    """Load the seccomp filter (no_new_privs must be set, or the caller be root)."""
    insns = program(m, os.getpid() if pid is None else pid)
    body = _CharP(_encode(insns))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = len(insns).to_bytes(2, "little") + bytes(6) + _address(body).to_bytes(8, "little")
    # ``body`` stays referenced until prctl returned: the kernel copies the filter.
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, _CharP(fprog))
    del body


def hide_proc() -> None:
    """A private mount namespace whose /proc is an empty, read-only tmpfs (root only)."""
    _call("unshare", _Int(CLONE_NEWNS))
    _call("mount", None, _CharP(b"/"), None, _ULong(MS_REC | MS_PRIVATE), None)
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    _call("mount", _CharP(b"none"), _CharP(b"/proc"), _CharP(b"tmpfs"), _ULong(flags),
          _CharP(b"mode=0,size=4k"))  # fmt: skip


def confine(hide: bool = False) -> None:
    """Confine this process and its descendants; see the module docstring.

    ``hide``: also hide /proc (for a receiver that will not chroot). It needs root;
    without root there is no other uid to protect from, so it is skipped.
    """
    m = machine()
    if m is None:
        raise SandboxError(
            f"no seccomp filter for this machine ({os.uname().machine}): "
            "smap cannot keep away from smapd's processes here"
        )
    if hide and os.geteuid() == 0:
        hide_proc()
    no_new_privs()
    install_filter(m)
