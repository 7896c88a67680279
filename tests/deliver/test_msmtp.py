"""End to end with a real sendmail-compatible program: Debian's msmtp relays what smapd
hands it to an SMTP sink on loopback (CI installs msmtp)."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deliver.kit import make_queue

MSMTP = shutil.which("msmtp") or "/usr/bin/msmtp"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("backend"),
    pytest.mark.skipif(not os.path.exists(MSMTP), reason="msmtp is not installed"),
]


class Sink:
    """A minimal SMTP server: records each transaction's envelope and data; refuses
    RCPT for the addresses in ``unknown`` as a real MTA does for a user it lacks."""

    def __init__(self, unknown: tuple[bytes, ...] = ()) -> None:
        self.unknown = unknown
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.mails: list[tuple[bytes, list[bytes], bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                self._session(f)

    def _session(self, f: object) -> None:
        rfile = wfile = f

        def reply(line: bytes) -> None:
            wfile.write(line + b"\r\n")  # type: ignore[attr-defined]
            wfile.flush()  # type: ignore[attr-defined]

        reply(b"220 sink ESMTP")
        sender, rcpts = b"", []
        while line := rfile.readline():  # type: ignore[attr-defined]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                reply(b"250 sink")
            elif verb == b"MAIL":
                sender, rcpts = line[10:].strip(), []
                reply(b"250 ok")
            elif verb == b"RCPT":
                rcpt = line[8:].strip()
                if rcpt.strip(b"<>") in self.unknown:
                    reply(b"550 5.1.1 " + rcpt + b": Recipient address rejected: User unknown")
                    continue
                rcpts.append(rcpt)
                reply(b"250 ok")
            elif verb == b"DATA":
                reply(b"354 go ahead")
                data = b""
                while (chunk := rfile.readline()) != b".\r\n":  # type: ignore[attr-defined]
                    data += chunk
                self.mails.append((sender, rcpts, data))
                reply(b"250 queued")
            elif verb == b"QUIT":
                reply(b"221 bye")
                return
            else:
                reply(b"250 ok")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.close()


def test_msmtp_relays_what_smapd_hands_it(tmp_path: Path, sink: Sink) -> None:
    home = tmp_path / "home"
    home.mkdir()
    rc = home / ".msmtprc"
    rc.write_text(
        "account default\nhost 127.0.0.1\n"
        f"port {sink.port}\nauth off\ntls off\n"
        "set_from_header off\nset_date_header off\nset_msgid_header off\n"
    )
    rc.chmod(0o600)
    q = make_queue(tmp_path, MSMTP)
    trace = "Received: from client.example by mx.example via smapq\n"
    body = b"Subject: e2e\n\n.\n..\nbody line\n"
    ids = [
        q.add(["a@x.example", "b@y.example"], body=body, trace=trace, sender="s@example.org"),
        q.add(["bounce-target@x.example"], body=body, trace=trace, sender=""),
    ]
    env = {**os.environ, "HOME": str(home)}
    proc = q.spool.smapq("deliver", "--once", check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [q.row(i).state for i in ids] == ["delivered", "delivered"]
    envelopes = sorted((s, r) for s, r, _ in sink.mails)
    assert envelopes == [
        (b"<>", [b"<bounce-target@x.example>"]),
        (b"<s@example.org>", [b"<a@x.example>", b"<b@y.example>"]),
    ]
    # On the wire: CRLF line ends and dot-stuffing; undone, it is the message we queued.
    wire = sink.mails[0][2]
    unstuffed = b"".join(
        line[1:] if line.startswith(b".") else line for line in wire.splitlines(keepends=True)
    )
    assert unstuffed.replace(b"\r\n", b"\n") == trace.encode() + body


def test_msmtp_refusal_is_recorded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = home / ".msmtprc"
    rc.write_text(f"account default\nhost 127.0.0.1\nport {port}\nauth off\ntls off\n")
    rc.chmod(0o600)
    q = make_queue(tmp_path, MSMTP)
    qid = q.add(["a@x.example"])
    env = {**os.environ, "HOME": str(home)}
    proc = q.spool.smapq("deliver", "--once", check=False, env=env)
    row = q.row(qid)
    # msmtp exits EX_TEMPFAIL or EX_UNAVAILABLE for a refused connection; either way
    # the outcome and msmtp's own words are on record.
    assert row.last_exit in (69, 75), row.last_result
    assert "msmtp" in row.last_result
    assert proc.returncode in (1, 75)


def test_a_recipient_the_next_hop_refuses_is_bounced_with_its_reply(tmp_path: Path) -> None:
    sink = Sink(unknown=(b"nosuch@x.example",))
    try:
        home = tmp_path / "home"
        home.mkdir()
        rc = home / ".msmtprc"
        rc.write_text(
            f"account default\nhost 127.0.0.1\nport {sink.port}\nauth off\ntls off\n"
            "set_from_header off\nset_date_header off\nset_msgid_header off\n"
        )
        rc.chmod(0o600)
        q = make_queue(tmp_path, MSMTP, "smapd: bounce on\nsmapd: hostname mx.example\n")
        qid = q.add(["nosuch@x.example"], body=b"Subject: hi\n\nbody\n", sender="s@example.org")
        env = {**os.environ, "HOME": str(home)}
        q.spool.smapq("deliver", "--once", check=False, env=env)
        assert q.row(qid).state == "bad", q.row(qid).last_result
        proc = q.spool.smapq("deliver", "--once", check=False, env=env)
        assert proc.returncode == 0, proc.stderr
    finally:
        sink.close()
    [(sender, rcpts, data)] = sink.mails
    assert (sender, rcpts) == (b"<>", [b"<s@example.org>"])
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    status = list(msg.iter_parts())[1].get_payload()
    assert isinstance(status, list)
    [_, failed] = status
    assert failed["Final-Recipient"] == "rfc822; nosuch@x.example"
    assert failed["Status"] == "5.1.1"
    assert failed["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <nosuch@x.example>: Recipient address rejected: User unknown"
    )
