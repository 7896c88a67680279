"""The receiver's jail: the peer address, chroot and the privilege drop.

Purpose: the seam between pre-jail init (root, full file system) and post-jail work
(the smap uid, inside ``smap: directory``), as Postfix's pre_jail_init/post_jail_init.

Security: runs as root until ``enter``.  The order is chroot(directory) -> chdir("/")
-> setgroups([]) -> setgid -> setuid, then setuid(0) must fail and no id may be 0; any
surprise is fatal (JailError) and the session never starts.  FWTK smap never called
setgroups(), so root's supplementary groups survived its drop; this one does.
``smap: jail off`` skips only the chroot (for hosts without root); the uid drop is
still done when the receiver starts as root.

Diagnostics: every refusal is a JailError with one line of text for syslog.

Lean: stdlib C modules only (``_socket``, not ``socket``: that one imports enum).
"""

from __future__ import annotations

import os

from smapq.errors import PrivilegeError


class JailError(PrivilegeError):
    """The receiver cannot enter its jail as configured; it must not talk SMTP."""


def peer_address() -> tuple[str, int]:
    """The client's address and port: getpeername(0), else $REMOTE_ADDR/$REMOTE_PORT.

    Returns ("", 0) when neither is known (stdin is a pipe, as in a manual test).
    """
    import _socket  # noqa: PLC0415  (C module, cheap; kept next to its only use)

    try:
        sock = _socket.socket(fileno=0)
    except OSError:
        sock = None
    if sock is not None:
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        finally:
            sock.detach()  # fd 0 stays open: it is the connection
        if isinstance(peer, tuple):
            host = str(peer[0])
            if host.startswith("::ffff:") and "." in host:
                host = host[7:]  # an IPv4 client on a dual-stack socket
            return host, int(peer[1])
    # The environment is text anyone who starts smap controls, and the address goes
    # into the Received: header and the logs: it must be an IP address, nothing else.
    addr = os.environ.get("REMOTE_ADDR", "")
    if addr.startswith("::ffff:") and "." in addr:
        addr = addr[7:]
    if addr and not _is_ip(addr):
        addr = ""
    port = os.environ.get("REMOTE_PORT", "")
    return addr, int(port) if port.isdigit() and len(port) <= 5 else 0


def _is_ip(text: str) -> bool:
    import _socket  # noqa: PLC0415  (see peer_address)

    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, text)
        except (OSError, ValueError):
            continue
        return True
    return False


def preflight(chroot: bool, uid: int | None) -> None:
    """Refuse, before anything is done, a jail that ``enter`` could not make."""
    root = os.geteuid() == 0
    if chroot and not root:
        raise JailError(
            "the jail needs root: start smap from inetd as root, or set 'smap: jail off'"
        )
    if root and uid is None:
        raise JailError("smap: userid is not set; smap will not serve mail as root")


def enter(directory: str, chroot: bool, uid: int | None, gid: int | None) -> None:
    """Chroot (when ``chroot``) and drop to uid/gid; raises JailError on any failure."""
    preflight(chroot, uid)
    root = os.geteuid() == 0
    try:
        if chroot:
            os.chroot(directory)
            os.chdir("/")
        else:
            os.chdir(directory)
        if root:
            assert uid is not None
            os.setgroups([])
            os.setgid(gid if gid is not None else uid)
            os.setuid(uid)
    except OSError as exc:
        raise JailError(f"cannot enter the jail {directory}: {exc.strerror}") from None
    if uid is not None and os.geteuid() != uid:
        raise JailError(f"running as uid {os.geteuid()}, but smap: userid is {uid}")
    check_dropped()


def check_dropped() -> None:
    """Refuse to go on with any root id left, or if root can be regained."""
    ids = os.getresuid() + os.getresgid()
    if 0 in ids:
        raise JailError(f"still running with a root id (uids/gids {ids})")
    if 0 in os.getgroups():
        raise JailError("still a member of group 0")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise JailError("setuid(0) succeeded after the privilege drop")
