"""STARTTLS (RFC 3207) on both transports, with real clients: smtplib, swaks, msmtp,
openssl s_client; the injection class of CVE-2011-0411; the key outside the jail; bad
certificates as configuration errors; handshakes that fail or are abandoned."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smapq.errors import EX_CONFIG
from smapq.smtp import replies as R
from tests.conftest import program, root_only
from tests.receive.conftest import Rig, spool_for_receiver
from tests.receive.superserver import Client

pytestmark = pytest.mark.integration

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"
MSMTP = shutil.which("msmtp") or "/usr/bin/msmtp"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
MESSAGE = b"Subject: tls\r\n\r\nover TLS\r\n"


class Certs:
    """A self-signed certificate and its key (0600), plus a key that matches nothing."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.cert = root / "cert.pem"
        self.key = root / "key.pem"
        self.other_key = root / "other.pem"
        for out, key in ((self.cert, self.key), (root / "other-cert.pem", self.other_key)):
            subprocess.run(
                [
                    OPENSSL,
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=localhost",
                    "-keyout",
                    str(key),
                    "-out",
                    str(out),
                ],
                check=True,
                capture_output=True,
            )
            key.chmod(0o600)
            out.chmod(0o644)

    def table(self, cert: Path | None = None, key: Path | None = None) -> str:
        return f"smap: tlscert {cert or self.cert}\nsmap: tlskey {key or self.key}\n"


@pytest.fixture(scope="module")
def certs() -> Iterator[Certs]:
    root = Path(tempfile.mkdtemp(prefix="smapq-tls-"))
    root.chmod(0o755)
    yield Certs(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tls_rig(rig_factory: Callable[..., Rig], transport: str, certs: Certs) -> Rig:
    return rig_factory(certs.table(), kind=transport)


def client_context(**kw: object) -> ssl.SSLContext:
    """A client that checks nothing about the server: the certificate is self-signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, value in kw.items():
        setattr(ctx, name, value)
    return ctx


class TlsClient(Client):
    """The raw client after STARTTLS: the same reads and writes over the TLS socket."""

    def __init__(self, plain: Client, ctx: ssl.SSLContext | None = None) -> None:
        plain.file.close()
        super().__init__((ctx or client_context()).wrap_socket(plain.sock))


def tls(rig: Rig, c: Client) -> TlsClient:
    """``c`` after the handshake; the rig closes it at the end of the test."""
    t = TlsClient(c)
    rig.clients.append(t)
    return t


def starttls(rig: Rig) -> TlsClient:
    c = rig.client()
    assert c.cmd(b"EHLO client").startswith(b"250-")
    assert c.cmd(b"STARTTLS") == R.R220_STARTTLS
    return tls(rig, c)


def test_smtplib_sends_over_starttls(tls_rig: Rig) -> None:
    with smtplib.SMTP("127.0.0.1", tls_rig.server.port, timeout=60) as smtp:
        tls_rig.opened += 1
        smtp.ehlo("client")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=client_context())
        smtp.ehlo("client")
        assert not smtp.has_extn("starttls")  # RFC 3207 4.2
        assert smtp.sendmail("a@b.c", ["d@e.f"], MESSAGE) == {}
    ((protocol, trace, _helo),) = tls_rig.rows("SELECT protocol, trace, helo FROM messages")
    assert protocol == "ESMTPS"
    assert "(using TLSv1.3 with cipher TLS_" in str(trace)
    assert "with ESMTPS" in str(trace)
    events = tls_rig.rows("SELECT detail, code FROM events WHERE kind = 'tls'")
    assert (
        len(events) == 1 and str(events[0][0]).startswith("TLSv1.3 TLS_") and events[0][1] == 220
    )
    (accept,) = tls_rig.rows("SELECT detail FROM events WHERE kind = 'accept'")
    assert accept[0] == events[0][0]  # the message's own row names version and cipher
    # The reports: by version and cipher, per client, and the daily summary's share.
    version, cipher = str(events[0][0]).split(" ")
    by_version = json.loads(tls_rig.spool.smapq("report", "tls", "--format", "json").stdout)[
        "rows"
    ]
    assert [(r["version"], r["cipher"], r["sessions"], r["share"]) for r in by_version] == [
        (version, cipher, 1, "100.0%")
    ]
    sessions = tls_rig.spool.smapq("report", "sessions", "--format", "json").stdout
    per_client = json.loads(sessions)["rows"]
    assert [(r["client_addr"], r["accepted"], r["tls"]) for r in per_client] == [
        ("127.0.0.1", 1, 1)
    ]
    daily = tls_rig.spool.smapq("report", "daily").stdout
    assert f"100% of connections (1 session): {version} 100%" in daily


def test_smtputf8_over_tls_is_utf8smtps(tls_rig: Rig) -> None:
    t = starttls(tls_rig)
    t.cmd(b"EHLO client")
    assert t.cmd(b"MAIL FROM:<a@b.c> SMTPUTF8").startswith(b"250 ")
    assert t.cmd(b"RCPT TO:<d@e.f>").startswith(b"250 ")
    assert t.cmd(b"DATA").startswith(b"354")
    assert t.cmd(MESSAGE + b".").startswith(b"250 ")
    t.cmd(b"QUIT")
    assert tls_rig.rows("SELECT protocol FROM messages") == [("UTF8SMTPS",)]


def test_commands_pipelined_behind_starttls_are_never_run(tls_rig: Rig) -> None:
    """CVE-2011-0411: plaintext sent in the same write as STARTTLS is discarded."""
    c = tls_rig.client()
    assert c.cmd(b"EHLO client").startswith(b"250-")
    c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@y.z>\r\n")
    assert c.reply() == R.R220_STARTTLS
    t = tls(tls_rig, c)  # a plaintext 250 to RSET or MAIL would break this handshake
    # The session starts again: no MAIL happened, and neither did an EHLO.
    assert t.cmd(b"RCPT TO:<d@e.f>") == R.plain(R.R503_NEED_MAIL)
    assert t.cmd(b"EHLO client").startswith(b"250-")
    assert t.cmd(b"MAIL FROM:<a@b.c>").startswith(b"250 ")
    t.cmd(b"QUIT")
    assert tls_rig.rows("SELECT count(*) FROM events WHERE kind = 'mail'") == [(1,)]
    dropped = tls_rig.rows("SELECT detail FROM events WHERE kind = 'reject'")
    assert ("25 octets pipelined after STARTTLS discarded",) in dropped


def test_second_starttls_and_starttls_without_a_certificate(
    tls_rig: Rig, rig_factory: Callable[..., Rig], transport: str
) -> None:
    t = starttls(tls_rig)
    assert t.cmd(b"EHLO client").startswith(b"250-")
    assert t.cmd(b"STARTTLS") == R.R554_TLS_ACTIVE
    assert t.cmd(b"STARTTLS x") == R.R554_TLS_ACTIVE
    t.cmd(b"QUIT")
    plain = rig_factory(kind=transport).client()
    ehlo = plain.cmd(b"EHLO client")
    assert b"STARTTLS" not in ehlo
    assert plain.cmd(b"STARTTLS") == R.R502_NOT_IMPLEMENTED
    plain.cmd(b"QUIT")


def test_starttls_with_an_argument_is_a_syntax_error(tls_rig: Rig) -> None:
    c = tls_rig.client()
    assert c.cmd(b"EHLO client").startswith(b"250-")
    assert c.cmd(b"STARTTLS now") == R.R501_STARTTLS_SYNTAX
    assert c.cmd(b"NOOP").startswith(b"250 ")  # still plaintext, still talking
    c.cmd(b"QUIT")


def test_swaks_tls(tls_rig: Rig) -> None:
    done = subprocess.run(
        [
            SWAKS,
            "--server",
            "127.0.0.1",
            "--port",
            str(tls_rig.server.port),
            "--tls",
            "--from",
            "a@b.c",
            "--to",
            "d@e.f",
            "--helo",
            "client",
            "--timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    tls_rig.opened += 1
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TLS started" in done.stdout
    assert tls_rig.rows("SELECT protocol FROM messages") == [("ESMTPS",)]


def test_msmtp_tls(tls_rig: Rig, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            MSMTP,
            "--host=127.0.0.1",
            f"--port={tls_rig.server.port}",
            "--tls=on",
            "--tls-starttls=on",
            "--tls-certcheck=off",
            "--from=a@b.c",
            "--domain=client",
            "d@e.f",
        ],
        input=MESSAGE,
        capture_output=True,
        timeout=120,
        check=False,
    )
    tls_rig.opened += 1
    assert done.returncode == 0, done.stderr
    assert tls_rig.rows("SELECT protocol, mail_from FROM messages") == [("ESMTPS", "a@b.c")]


def s_client(port: int, *proto: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            OPENSSL,
            "s_client",
            "-starttls",
            "smtp",
            "-connect",
            f"127.0.0.1:{port}",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            *proto,
        ],  # let the client offer TLS 1.1
        input="QUIT\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tls_1_1_does_not_negotiate_and_1_2_does(tls_rig: Rig) -> None:
    old = s_client(tls_rig.server.port, "-tls1_1")
    tls_rig.opened += 1
    assert old.returncode != 0
    assert "Cipher is (NONE)" in old.stdout or "Cipher is" not in old.stdout
    new = s_client(tls_rig.server.port, "-tls1_2")
    tls_rig.opened += 1
    assert new.returncode == 0, new.stdout + new.stderr
    assert "Protocol  : TLSv1.2" in new.stdout
    assert "Cipher    : ECDHE-ECDSA-" in new.stdout  # Mozilla intermediate: ECDHE + AEAD
    details = [str(d) for (d,) in tls_rig.rows("SELECT detail FROM events WHERE kind = 'tls'")]
    assert any(d.startswith("handshake failed: ") for d in details), details
    assert any(d.startswith("TLSv1.2 ECDHE-ECDSA-") for d in details), details


def test_session_tickets_one_from_serve_none_from_inetd(tls_rig: Rig, transport: str) -> None:
    """serve sends one TLS 1.3 ticket per handshake, as Postfix's smtpd (not OpenSSL's
    two); the inetd receiver none, since its ticket key dies with the process."""
    done = s_client(tls_rig.server.port, "-tls1_3", "-msg", "-ign_eof")  # until 221
    tls_rig.opened += 1
    assert done.returncode == 0, done.stdout + done.stderr
    assert "221 " in done.stdout  # it read everything the server sent
    assert "TLS 1.3, Handshake" in done.stdout and "Finished" in done.stdout
    tickets = [ln for ln in done.stdout.splitlines() if "<<< " in ln and "NewSessionTicket" in ln]
    assert len(tickets) == (1 if transport == "serve" else 0), tickets


def test_failed_or_abandoned_handshake_ends_the_session_and_stores_nothing(
    tls_rig: Rig,
) -> None:
    # Not TLS at all after 220 Ready to start TLS.
    c = tls_rig.client()
    assert c.cmd(b"EHLO client").startswith(b"250-")
    assert c.cmd(b"STARTTLS") == R.R220_STARTTLS
    c.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhi\r\n.\r\n" + b"x" * 600)
    assert b"250" not in c.file.read()  # an alert at most, then the close
    # Half a ClientHello, then the client is gone.
    c2 = tls_rig.client()
    assert c2.cmd(b"EHLO client").startswith(b"250-")
    assert c2.cmd(b"STARTTLS") == R.R220_STARTTLS
    c2.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    c2.sock.shutdown(socket.SHUT_WR)
    assert c2.file.read() == b""
    assert tls_rig.rows("SELECT count(*) FROM messages") == [(0,)]
    failed = tls_rig.rows(
        "SELECT count(*) FROM events WHERE kind = 'tls' AND detail LIKE 'handshake failed: %'"
    )
    assert failed == [(2,)]
    ends = tls_rig.rows("SELECT detail FROM events WHERE kind = 'disconnect'")
    assert ends == [("TLS handshake failed",), ("TLS handshake failed",)]


def _open_fds(pid: int) -> set[str]:
    fds = f"/proc/{pid}/fd"
    out = set()
    for fd in os.listdir(fds):
        try:  # noqa: SIM105
            out.add(os.readlink(f"{fds}/{fd}"))
        except OSError:
            pass
    return out


def _status_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[2])  # effective
    raise AssertionError("no Uid line")


@root_only
def test_the_key_cannot_be_read_from_inside_the_jail(tls_rig: Rig, certs: Certs) -> None:
    """The receiver serving a TLS session holds no descriptor on the key, and from its
    root directory, as its uid, the key's path opens nothing."""
    t = starttls(tls_rig)
    assert t.cmd(b"EHLO client").startswith(b"250-")  # a live TLS session
    pids = tls_rig.server.children(running=True)
    assert pids
    for pid in pids:
        assert str(certs.key) not in _open_fds(pid)
        jail_root = os.readlink(f"/proc/{pid}/root")
        assert jail_root == str(tls_rig.spool.root / "spool")  # chrooted
        uid = _status_uid(pid)
        assert uid != 0
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child: become the jailed process's twin
            try:
                os.chroot(jail_root)
                os.chdir("/")
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                for path in (str(certs.key), "/" + certs.key.name):
                    try:
                        open(path, "rb").close()
                        os.write(write, b"opened " + path.encode())
                    except OSError:
                        pass
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as fh:
            assert fh.read() == b""
        os.waitpid(child, 0)
    t.cmd(b"QUIT")


def test_bad_certificate_or_key_is_a_config_error(tmp_path: Path, certs: Certs) -> None:
    cases = [
        (certs.table(key=certs.other_key), b": tlskey: ", b"does not match"),
        (certs.table(cert=certs.key), b": tlscert: ", b"is not a PEM certificate"),
        (certs.table(key=tmp_path / "missing.pem"), b": tlskey: ", b"cannot read"),
        (f"smap: tlscert {certs.cert}\n", b": tlscert: ", b"STARTTLS needs tlskey too"),
    ]
    for n, (extra, keyword, reason) in enumerate(cases):
        root = tmp_path / f"s{n}"
        root.mkdir()
        spool = spool_for_receiver(root, extra) if "tlskey" in extra else None
        table = spool.table if spool else tmp_path / f"t{n}"
        if spool is None:
            table.write_text(extra)
            table.chmod(0o600)
        done = subprocess.run(
            [program("smap"), "-t", str(table)],
            input=b"QUIT\r\n",
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert done.stdout.startswith(b"421 4.3.0 "), done
        assert done.returncode == EX_CONFIG, done
        line = next(ln for ln in done.stderr.splitlines() if b"fwtkcfgerr" in ln)
        assert keyword in line and reason in line, line
        assert f"{table}:".encode() in line, line
        if spool is None:
            continue
        serve = subprocess.run(
            [program("smapq"), "-t", str(table), "serve", "--listen", "127.0.0.1:0"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert serve.returncode == EX_CONFIG and reason in serve.stderr, serve
        check = spool.smapq("check-config", check=False)
        assert check.returncode == 1
        assert keyword.decode() in check.stderr and reason.decode() in check.stderr


@root_only
def test_check_config_wants_the_key_private(tmp_path: Path, certs: Certs) -> None:
    loose = tmp_path / "loose.pem"
    loose.write_bytes(certs.key.read_bytes())
    loose.chmod(0o644)
    spool = spool_for_receiver(tmp_path, certs.table(key=loose))
    check = spool.smapq("check-config", check=False)
    assert check.returncode == 1
    assert f"tlskey: {loose}: mode 0644" in check.stderr
    loose.chmod(0o600)
    os.chown(loose, 65534, 65534)  # nobody: smap's uid in these tables
    check = spool.smapq("check-config", check=False)
    assert "can read the key" in check.stderr
    os.chown(loose, 0, 0)
    check = spool.smapq("check-config", check=False)
    assert "tlskey" not in check.stderr and "tlscert" not in check.stderr.split("problem")[-1]
