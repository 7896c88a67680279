"""The listening sockets of ``smapq serve``: bound by root, or passed by systemd.

Purpose: ``--listen ADDR:PORT`` (repeatable; ``[v6addr]:port`` for IPv6, ``*:25`` for
every IPv4 address) binds as root before any worker exists; without ``--listen`` the
sockets of systemd socket activation with ``Accept=no`` are used (``LISTEN_FDS``
sockets from fd 3, valid only when ``LISTEN_PID`` is this process; the variables are
removed and the descriptors made close-on-exec, so nothing we start inherits them).

Security: IPv6 sockets are IPV6_V6ONLY, so ``0.0.0.0:25`` and ``[::]:25`` can both be
bound and each family's access rules stay separate.  SO_REUSEADDR only, never
SO_REUSEPORT: a second server on the same port must fail, not share the traffic.

Diagnostics: ``ListenError`` names the address and the system's reason.
"""

from __future__ import annotations

import os
import socket

from smapq.errors import SmapqError

SD_LISTEN_FDS_START = 3
BACKLOG = 1024


class ListenError(SmapqError):
    """An address cannot be parsed or bound; exit code 71 (EX_OSERR)."""

    exit_code = 71


def parse(spec: str) -> tuple[int, str, int]:
    """``ADDR:PORT`` -> (family, address, port)."""
    host, sep, port_text = spec.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ListenError(f"--listen {spec!r}: expected ADDR:PORT, e.g. 127.0.0.1:25 or [::1]:25")
    port = int(port_text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        family = socket.AF_INET6
    elif host in ("*", ""):
        host, family = "0.0.0.0", socket.AF_INET  # noqa: S104  (asked for: every address)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.inet_pton(family, host)
    except OSError:
        raise ListenError(f"--listen {spec!r}: {host!r} is not an IP address") from None
    return family, host, port


def bind(spec: str) -> socket.socket:
    family, host, port = parse(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {spec}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def from_systemd() -> list[socket.socket]:
    """The sockets systemd passed (``Accept=no``), or [] when there are none for us."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise ListenError(f"socket activation passed fd {fd}, which is not a stream socket")
        sock.setblocking(False)
        socks.append(sock)
    return socks


def open_all(specs: list[str]) -> list[socket.socket]:
    """Bind every ``--listen``; without any, take systemd's sockets."""
    if not specs:
        socks = from_systemd()
        if not socks:
            raise ListenError(
                "nothing to listen on: give --listen ADDR:PORT, or start under systemd "
                "socket activation (Accept=no)"
            )
        return socks
    socks = []
    try:
        for spec in specs:
            socks.append(bind(spec))
    except ListenError:
        for sock in socks:
            sock.close()
        raise
    return socks


def describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
