"""A STARTTLS load generator in Python: the fallback of bench/tls_source.c.

bench/intake.py --tls runs bench/tls_source.c (built with gcc, bench/tls_load.py);
this one runs only where gcc or libssl's headers are missing, and the bench says so,
since it costs 3-5 ms of CPU per message itself, more than the servers it measures.

    /path/venv/bin/python bench/tls_source.py -s SESSIONS -m MESSAGES [-l BYTES]
        [--plain] [--resume] 127.0.0.1:PORT

S client processes (forked, so the handshakes' CPU spreads over the cores as
smtp-source's sessions do), each sending its share of M messages, one per connection:
banner, EHLO, STARTTLS, the TLS handshake (no certificate check: the bench's
certificate is self-signed), EHLO again, MAIL, RCPT, DATA, a body of -l bytes, QUIT.
``--plain`` leaves out STARTTLS (the same client without TLS, for the handshake's
share of a server's CPU); ``--resume`` offers the previous connection's TLS session
(a ticket), as a client with a session cache does.

Output: one line ``messages wall_seconds client_cpu_seconds resumed``; the client CPU
(the children's user+system time) is what the generator itself costs, i.e. its
ceiling is about cores / (client CPU per message) when the server were free.

Diagnostics: any reply other than the expected one, a failed handshake or a timeout
ends that client with a message on stderr and the exit code 1.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import sys
import time

TIMEOUT = 60.0


class Failed(Exception):
    pass


def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one complete (multi-line) reply from the socket into ``buf``."""
    while True:
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start : nl + 1])
            start = nl + 1
            if line[3:4] == b" ":
                out = bytes(buf[:start])
                del buf[:start]
                return out
        chunk = sock.recv(65536)
        if not chunk:
            raise Failed("server closed the connection")
        buf += chunk


def _expect(sock: socket.socket, buf: bytearray, send: bytes, code: bytes) -> bytes:
    if send:
        sock.sendall(send)
    reply = _reply(sock, buf)
    if not reply.startswith(code):
        raise Failed(f"sent {send[:40]!r}, got {reply[:200]!r}")
    return reply


def one_message(
    port: int,
    body: bytes,
    ctx: ssl.SSLContext | None,
    session: ssl.SSLSession | None,
) -> tuple[ssl.SSLSession | None, bool]:
    """One connection, one message; (the TLS session for a later resume, resumed?)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock: socket.socket = raw
    tls: ssl.SSLSocket | None = None
    buf = bytearray()
    resumed = False
    try:
        _expect(sock, buf, b"", b"220")
        _expect(sock, buf, b"EHLO bench.example\r\n", b"250")
        if ctx is not None:
            _expect(sock, buf, b"STARTTLS\r\n", b"220")
            sock = tls = ctx.wrap_socket(raw, session=session)
            resumed = tls.session_reused
            _expect(sock, buf, b"EHLO bench.example\r\n", b"250")
        _expect(sock, buf, b"MAIL FROM:<bench@example.org>\r\n", b"250")
        _expect(sock, buf, b"RCPT TO:<sink@example.net>\r\n", b"250")
        _expect(sock, buf, b"DATA\r\n", b"354")
        _expect(sock, buf, body, b"250")
        _expect(sock, buf, b"QUIT\r\n", b"221")
        kept = tls.session if tls is not None else None
    finally:
        sock.close()
    return kept, resumed


def client(port: int, count: int, body: bytes, tls: bool, resume: bool) -> int:
    """A client process's loop; the number of resumed sessions."""
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    session = None
    resumed = 0
    for _ in range(count):
        kept, again = one_message(port, body, ctx, session)
        resumed += again
        if resume:
            session = kept
    return resumed


def make_body(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    text = b"Subject: bench\r\n\r\n" + line * max(1, size // len(line))
    return text + b".\r\n"


def run(port: int, sessions: int, messages: int, size: int, tls: bool, resume: bool) -> str:
    body = make_body(size)
    share = [messages // sessions + (i < messages % sessions) for i in range(sessions)]
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    for n in share:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a client process
            os.close(go_w)
            os.close(res_r)
            os.read(go_r, 1)
            code = 0
            try:
                got = client(port, n, body, tls, resume)
                os.write(res_w, f"{got}\n".encode())
            except (Failed, OSError, ssl.SSLError) as exc:
                print(f"tls_source: {exc}", file=sys.stderr)
                code = 1
            os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(res_w)
    t0 = time.perf_counter()
    os.write(go_w, b"x" * sessions)
    failed = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed += status != 0
    wall = time.perf_counter() - t0
    with os.fdopen(res_r) as fh:
        resumed = sum(int(x) for x in fh.read().split())
    os.close(go_w)
    if failed:
        raise SystemExit(f"tls_source: {failed} of {sessions} clients failed")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return f"{messages} {wall:.6f} {ru.ru_utime + ru.ru_stime:.6f} {resumed}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("-s", "--sessions", type=int, default=1)
    ap.add_argument("-m", "--messages", type=int, default=100)
    ap.add_argument("-l", "--size", type=int, default=2048)
    ap.add_argument("--plain", action="store_true", help="no STARTTLS")
    ap.add_argument("--resume", action="store_true", help="offer the last TLS session")
    ap.add_argument("target", help="127.0.0.1:PORT")
    args = ap.parse_args(argv)
    port = int(args.target.rsplit(":", 1)[1])
    print(run(port, args.sessions, args.messages, args.size, not args.plain, args.resume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
