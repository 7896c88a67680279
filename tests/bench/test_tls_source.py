"""bench/tls_source.c: every reply code is checked, every error counted, tickets counted.

The STARTTLS load generator of bench/intake.py --tls is built here as the bench builds
it (bench/tls_load.py, gcc and libssl) and run against a scripted STARTTLS server on
a real socket that answers each connection in a known way, so a miscount or an
ignored reply shows as a wrong number.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.bench.scripted import ScriptedServer

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from benchrig import RigError, make_certs  # noqa: E402
from tls_load import Generator  # noqa: E402

pytestmark = pytest.mark.integration

OK, TEMPFAIL, INJECT, NO_STARTTLS = "ok", "tempfail", "inject", "no-starttls"


class ScriptedTlsServer(ScriptedServer):
    """Answers connection k as ``script(k)`` says; STARTTLS with ``ctx``; counts."""

    def __init__(self, ctx: ssl.SSLContext, script: Callable[[int], str]) -> None:
        self.ctx = ctx
        super().__init__(script)

    def _serve(self, conn: socket.socket, k: int) -> None:
        what = self.script(k)
        opened: list[socket.socket | BinaryIO] = [conn]
        try:
            self._session(conn, what, opened)
        except (OSError, ssl.SSLError):
            pass  # the client gave up on this connection, as it should
        finally:
            for thing in reversed(opened):
                thing.close()

    def _session(
        self, conn: socket.socket, what: str, opened: list[socket.socket | BinaryIO]
    ) -> None:
        sock: socket.socket = conn
        rfile = sock.makefile("rb")
        opened.append(rfile)
        sock.sendall(b"220 scripted ESMTP\r\n")
        tls = False
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                offer = b"" if tls or what == NO_STARTTLS else b"250-STARTTLS\r\n"
                sock.sendall(b"250-scripted\r\n" + offer + b"250 PIPELINING\r\n")
            elif verb == b"STAR":
                extra = b"250 injected\r\n" if what == INJECT else b""
                sock.sendall(b"220 2.0.0 go ahead\r\n" + extra)
                rfile.close()
                sock = self.ctx.wrap_socket(conn, server_side=True)
                rfile = sock.makefile("rb")
                opened += [sock, rfile]
                tls = True
            elif verb in (b"MAIL", b"RCPT"):
                sock.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"DATA":
                sock.sendall(b"354 go ahead\r\n")
                while rfile.readline() not in (b".\r\n", b""):
                    pass
                with self.lock:
                    self.did[what] += 1
                if what == TEMPFAIL:
                    sock.sendall(b"451 4.3.0 try again later\r\n")
                else:
                    sock.sendall(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                sock.sendall(b"221 2.0.0 bye\r\n")
                return
            else:
                sock.sendall(b"500 5.5.2 what?\r\n")


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="smapq-tls-source-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def generator(work: Path) -> Generator:
    gen = Generator(work / "gen")
    assert gen.binary is not None, gen.name  # gcc and libssl-dev are part of the rig
    return gen


def server_ctx(work: Path, tickets: int) -> ssl.SSLContext:
    cert, key = make_certs(work / "certs")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.num_tickets = tickets
    return ctx


def run(generator: Generator, port: int, *flags: str) -> tuple[int, dict[str, str], str]:
    assert generator.binary is not None
    argv = [str(generator.binary), "-s", "3", "-m", "12", "-l", "2048", *flags]
    done = subprocess.run(
        [*argv, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=120, check=False
    )
    out = dict(word.split("=", 1) for word in done.stdout.split())
    return done.returncode, out, done.stderr


def test_every_message_counted_with_its_tickets(generator: Generator, work: Path) -> None:
    server = ScriptedTlsServer(server_ctx(work, tickets=2), lambda k: OK)
    try:
        code, out, err = run(generator, server.port)
    finally:
        server.close()
    assert (code, err) == (0, "")
    assert out["messages"] == out["ok"] == "12" and out["errors"] == "0"
    assert server.did[OK] == 12
    assert out["tickets"] == "24"  # two per TLS 1.3 handshake, as the server was told
    assert out["tls"] == "TLSv1.3" and out["resumed"] == "0"


def test_an_unexpected_reply_is_an_error_counted_not_a_message(
    generator: Generator, work: Path
) -> None:
    server = ScriptedTlsServer(server_ctx(work, 1), lambda k: TEMPFAIL if k % 3 == 0 else OK)
    try:
        code, out, err = run(generator, server.port)
    finally:
        server.close()
    assert code == 1
    assert (out["ok"], out["errors"]) == ("8", "4")
    assert "end of data: expected 250, got: 451 4.3.0 try again later" in err
    with pytest.raises(RigError, match="exited 1"):
        server = ScriptedTlsServer(server_ctx(work, 1), lambda k: TEMPFAIL if k == 5 else OK)
        try:
            generator.run(server.port, 2, 8, 2048)
        finally:
            server.close()


def test_bytes_after_the_starttls_reply_and_a_missing_offer_are_errors(
    generator: Generator, work: Path
) -> None:
    server = ScriptedTlsServer(server_ctx(work, 1), lambda k: INJECT if k < 2 else NO_STARTTLS)
    try:
        code, out, err = run(generator, server.port)
    finally:
        server.close()
    assert code == 1 and (out["ok"], out["errors"]) == ("0", "12")
    assert err.count("bytes after the 220 (injection?)") == 2
    assert "STARTTLS not offered" in err


def test_plain_mode_and_resumed_sessions(generator: Generator, work: Path) -> None:
    server = ScriptedTlsServer(server_ctx(work, 1), lambda k: NO_STARTTLS)
    try:
        code, out, err = run(generator, server.port, "--plain")
    finally:
        server.close()
    assert (code, out["ok"], out["tls"], out["tickets"]) == (0, "12", "none", "0"), err
    server = ScriptedTlsServer(server_ctx(work, 1), lambda k: OK)
    try:
        code, out, err = run(generator, server.port, "--resume")
    finally:
        server.close()
    # each of the 3 sessions resumes on all its connections but the first
    assert (code, out["ok"], out["resumed"]) == (0, "12", "9"), err


def test_the_python_fallback_says_so(work: Path) -> None:
    gen = Generator(work / "py", python_only=True)
    assert gen.binary is None and "Python fallback" in gen.name
    server = ScriptedTlsServer(server_ctx(work, 1), lambda k: OK)
    try:
        load = gen.run(server.port, 2, 4, 512)
    finally:
        server.close()
    assert load.tickets == -1 and load.wall > 0 and server.did[OK] == 4
