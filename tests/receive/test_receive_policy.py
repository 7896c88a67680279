"""The access policy on real sockets, on both transports (smap under inetd, smapq serve):
domains, recipients, rules by client network (IPv4 and IPv6), sender and recipient,
events and ``report refused --by rule``, reloads, configuration errors."""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smapq.errors import EX_CONFIG
from smapq.smtp import replies as R
from tests.conftest import Spool, program
from tests.receive.conftest import Rig, spool_for_receiver
from tests.receive.superserver import SERVE, Client, SuperServer, wait_until

pytestmark = pytest.mark.integration


def rcpt_code(c: Client, rcpt: bytes) -> bytes:
    return c.cmd(b"RCPT TO:<" + rcpt + b">")[:9]


def open_mail(c: Client, sender: bytes = b"a@b.example") -> None:
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    assert c.cmd(b"MAIL FROM:<" + sender + b">").startswith(b"250 ")


def send_data(c: Client, body: bytes = b"hello") -> bytes:
    assert c.cmd(b"DATA") == R.R354_DATA
    return c.cmd(body + b"\r\n.")


def report(spool: Spool, *args: str) -> list[dict[str, object]]:
    out = spool.smapq("report", "refused", "--by", "rule", *args, "--format", "json").stdout
    rows: list[dict[str, object]] = json.loads(out)["rows"]
    return rows


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


# --- domains and recipients -----------------------------------------------------------


def test_domains_and_recipients_refuse_at_rcpt_and_store_only_the_accepted(
    rig_factory: Callable[..., Rig], transport: str, open_dir: Path
) -> None:
    valid = write(open_dir / "recipients", "alice\npostmaster@example.com\n")
    domains = write(open_dir / "domains", "# ours\nexample.com\n.example.com\n")
    rig = rig_factory(f"smap: domains {domains}\nsmap: recipients {valid}\n", kind=transport)
    table = rig.spool.table
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"alice@example.com") == b"250 2.1.5"
    assert rcpt_code(c, b"Alice@Mail.Example.com") == b"250 2.1.5"
    assert c.cmd(b"RCPT TO:<u@elsewhere.example>") == (
        R.R550_RELAY_DENIED % b"<u@elsewhere.example>"
    )
    assert c.cmd(b"RCPT TO:<bob@example.com>") == R.R550_UNKNOWN_RCPT % b"<bob@example.com>"
    assert rcpt_code(c, b"postmaster") == b"250 2.1.5"
    assert send_data(c).startswith(b"250 2.0.0 ")
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert rig.rows("SELECT address FROM recipients ORDER BY id") == [
        ("alice@example.com",),
        ("Alice@Mail.Example.com",),
        ("postmaster",),
    ]
    n = len(table.read_text().splitlines())
    events = rig.rows(
        "SELECT kind, address, code, detail FROM events WHERE kind IN ('rcpt', 'reject') "
        "ORDER BY id"
    )
    assert events == [
        ("rcpt", "alice@example.com", 250, f"policy {table}:{n} recipients"),
        ("rcpt", "Alice@Mail.Example.com", 250, f"policy {table}:{n} recipients"),
        (
            "reject",
            "u@elsewhere.example",
            550,
            f"policy {table}:{n - 1} domains: relay access denied",
        ),
        ("reject", "bob@example.com", 550, f"policy {table}:{n} recipients: user unknown"),
        ("rcpt", "postmaster", 250, f"policy {table}:{n} recipients"),
    ]
    rows = {(r["rule"], r["reason"]): r for r in report(rig.spool)}
    relay = rows[(f"{table}:{n - 1}", "domains: relay access denied")]
    assert (relay["code"], relay["count"], relay["clients"], relay["address"]) == (
        550,
        1,
        1,
        "u@elsewhere.example",
    )
    assert rows[(f"{table}:{n}", "recipients: user unknown")]["count"] == 1
    daily = rig.spool.smapq("report", "daily", "--width", "0").stdout
    assert f"policy {table}:{n - 1} domains: relay access denied" in daily
    assert f"policy {table}:{n} recipients: user unknown" in daily


# --- rules ----------------------------------------------------------------------------

RULES = """\
smap: domains example.com
smap: rule allow 127.0.0.0/8 *@trusted.example *
smap: rule noto 127.0.0.0/8 * *@private.example.com
smap: rule deny 127.0.0.1 *@spam.example *
smap: rule deny 10.0.0.0/8,2001:db8::/32 * *
smap: rule noto * <> *
"""


def test_rules_by_client_network_sender_and_recipient(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory(RULES, kind=transport)
    table = rig.spool.table
    # "smap: rule noto * <> *" -> "noto * <> *": its line number in RULES
    line = {text.split(None, 2)[2]: i for i, text in enumerate(RULES.splitlines(), 1)}
    first = len(table.read_text().splitlines()) - len(line)  # the table line of RULES[0]

    def where(rule: str) -> str:
        return f"{table}:{first + line[rule]}"

    c = rig.client()
    # allow: a trusted sender from our network may relay; first match wins over noto
    open_mail(c, b"boss@trusted.example")
    assert rcpt_code(c, b"u@elsewhere.example") == b"250 2.1.5"
    assert rcpt_code(c, b"u@private.example.com") == b"250 2.1.5"
    assert send_data(c).startswith(b"250 ")
    # noto: only the matching recipient is refused
    assert c.cmd(b"MAIL FROM:<a@b.example>").startswith(b"250 ")
    assert c.cmd(b"RCPT TO:<u@private.example.com>") == (R.R550_NOTO % b"<u@private.example.com>")
    assert rcpt_code(c, b"u@example.com") == b"250 2.1.5"
    assert send_data(c).startswith(b"250 ")
    # the null sender: noto for every recipient
    assert c.cmd(b"MAIL FROM:<>").startswith(b"250 ")
    assert rcpt_code(c, b"u@example.com") == b"550 5.7.1"
    assert c.cmd(b"RSET").startswith(b"250 ")
    # deny: this recipient and the whole transaction, then every later MAIL
    assert c.cmd(b"MAIL FROM:<x@spam.example>").startswith(b"250 ")
    assert c.cmd(b"RCPT TO:<u@example.com>") == R.R554_DENIED % b"<u@example.com>"
    assert c.cmd(b"DATA") == R.R503_NEED_MAIL
    assert c.cmd(b"MAIL FROM:<a@b.example>") == R.R554_DENIED_SESSION
    assert c.cmd(b"QUIT") == R.R221_BYE
    stored = rig.rows(
        "SELECT m.mail_from, r.address FROM recipients r JOIN messages m "
        "ON m.id = r.message_id ORDER BY r.id"
    )
    assert stored == [
        ("boss@trusted.example", "u@elsewhere.example"),
        ("boss@trusted.example", "u@private.example.com"),
        ("a@b.example", "u@example.com"),
    ]
    refusals = rig.rows("SELECT code, detail FROM events WHERE kind = 'reject' ORDER BY id")
    deny = where("deny 127.0.0.1 *@spam.example *")
    assert refusals == [
        (550, f"policy {where('noto 127.0.0.0/8 * *@private.example.com')} noto"),
        (550, f"policy {where('noto * <> *')} noto"),
        (554, f"policy {deny} deny"),
        (503, "DATA before MAIL"),
        (554, f"policy {deny} deny: session denied"),
    ]
    accepted = rig.rows("SELECT DISTINCT detail FROM events WHERE kind = 'rcpt' ORDER BY 1")
    allow = where("allow 127.0.0.0/8 *@trusted.example *")
    assert accepted == [(f"policy {table}:{first + 1} domains",), (f"policy {allow} allow",)]
    by_rule = report(rig.spool)
    assert [(r["rule"], r["reason"], r["code"], r["count"]) for r in by_rule] == sorted(
        [
            (deny, "deny", 554, 1),
            (deny, "deny: session denied", 554, 1),
            (where("noto 127.0.0.0/8 * *@private.example.com"), "noto", 550, 1),
            (where("noto * <> *"), "noto", 550, 1),
            ("-", "DATA before MAIL", 503, 1),
        ],
        key=lambda r: f"policy {r[0]} {r[1]}" if r[0] != "-" else str(r[1]),
    )


def test_a_client_network_rule_that_does_not_match_leaves_the_domain_check(
    rig_factory: Callable[..., Rig], transport: str
) -> None:
    rig = rig_factory(
        "smap: domains example.com\nsmap: rule deny 10.0.0.0/8 * *\n", kind=transport
    )
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"u@example.com") == b"250 2.1.5"
    assert rcpt_code(c, b"u@example.org") == b"550 5.7.1"
    c.cmd(b"QUIT")


# --- IPv6 on the wire -------------------------------------------------------------------


class V6Server(SuperServer):
    """The same super-servers, listening on [::1] only."""

    def _command(self) -> list[str]:
        if self.kind == SERVE:
            return [*self.argv, "--listen", f"[::1]:{self.port}"]
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf = self.workdir / "inetd.conf"
        conf.write_text(
            f"[::1]:{self.port} stream tcp6 nowait.{self.rate} {user} "
            f"{self.argv[0]} smap {' '.join(self.argv[1:])}\n"
        )
        return ["/usr/sbin/inetd", "-i", str(conf)]

    def connect(self, timeout: float = 120, rcvbuf: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET6)
        sock.settimeout(timeout)
        sock.connect(("::1", self.port))
        return sock


@pytest.fixture
def v6_rig(open_dir: Path, transport: str) -> Iterator[Callable[[str], Rig]]:
    made: list[Rig] = []

    def make(extra: str) -> Rig:
        root = open_dir / f"v6-{len(made)}"
        root.mkdir(mode=0o755)
        spool = spool_for_receiver(root, extra)
        if transport == SERVE:
            argv = [program("smapq"), "-t", str(spool.table), "serve", "--grace", "2"]
        else:
            argv = [program("smap"), "-t", str(spool.table)]
        made.append(Rig(spool, V6Server(transport, argv, root)))
        return made[-1]

    try:
        yield make
    finally:
        for rig in made:
            for c in rig.clients:
                c.close()
            rig.server.stop()


def test_ipv6_client_networks(v6_rig: Callable[[str], Rig]) -> None:
    rig = v6_rig(
        "smap: rule noto ::1 * *@private.example\n"
        "smap: rule noto 127.0.0.0/8 * *@v4.example\n"
        "smap: rule allow ::/0 * *@any6.example\n"
        "smap: rule deny * * *\n"
    )
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"u@private.example") == b"550 5.7.1"
    assert rcpt_code(c, b"u@any6.example") == b"250 2.1.5"
    # an IPv6 client is not in an IPv4 network: the deny below it decides
    assert rcpt_code(c, b"u@v4.example") == b"554 5.7.1"
    c.cmd(b"QUIT")
    assert rig.rows("SELECT DISTINCT client_addr FROM events") == [("::1",)]


def test_ipv4_mapped_client_matches_ipv4_networks(open_dir: Path) -> None:
    """$REMOTE_ADDR (a super-server that exports it) may be IPv4-mapped IPv6."""
    spool = spool_for_receiver(
        open_dir, "smap: strictpipelining off\nsmap: rule noto 192.0.2.0/24 * *\n"
    )
    session = b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nQUIT\r\n"
    for remote, code in (("::ffff:192.0.2.7", b"550 "), ("::ffff:198.51.100.7", b"250 ")):
        done = subprocess.run(
            [program("smap"), "-t", str(spool.table)],
            input=session,
            capture_output=True,
            timeout=120,
            env={"REMOTE_ADDR": remote},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split(b"\r\n")[3].startswith(code), done.stdout


# --- reloads ------------------------------------------------------------------------------


def test_a_changed_domains_file_counts_after_sighup_or_the_next_connection(
    rig_factory: Callable[..., Rig], transport: str, open_dir: Path
) -> None:
    domains = write(open_dir / "domains", "example.com\n")
    rig = rig_factory(f"smap: domains {domains}\n", kind=transport)
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"u@example.org") == b"550 5.7.1"
    c.cmd(b"QUIT")
    write(domains, "example.com\nexample.org\n")
    if transport == SERVE:
        # smapq serve built the policy once: the file counts only after a reload
        c = rig.client()
        open_mail(c)
        assert rcpt_code(c, b"u@example.org") == b"550 5.7.1"
        c.cmd(b"QUIT")
        rig.wait_sessions(0)
        (old,) = rig.server.children(running=True)
        assert rig.server.proc is not None
        rig.server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: old not in rig.server.children(running=True), 60, "old worker lives")
        wait_until(lambda: rig.server.children(running=True), 60, "no new worker")
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"u@example.org") == b"250 2.1.5"
    c.cmd(b"QUIT")


def test_sighup_with_a_broken_domains_file_keeps_the_old_policy(
    rig_factory: Callable[..., Rig], open_dir: Path
) -> None:
    domains = write(open_dir / "domains", "example.com\n")
    rig = rig_factory(f"smap: domains {domains}\n", kind=SERVE)
    (worker,) = rig.server.children(running=True)
    write(domains, "example.com\nnot a domain\n")
    assert rig.server.proc is not None
    rig.server.proc.send_signal(signal.SIGHUP)
    log = rig.server.log
    wait_until(lambda: b"reload refused" in log.read_bytes(), 60, "no refusal logged")
    assert f"{domains}:2: domains: one name per line".encode() in log.read_bytes()
    assert rig.server.children(running=True) == [worker]
    c = rig.client()
    open_mail(c)
    assert rcpt_code(c, b"u@example.com") == b"250 2.1.5"
    c.cmd(b"QUIT")


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("smap: rule allow 10.0.0.1/8 * *", b": rule: '10.0.0.1/8' has host bits set"),
        ("smap: rule allow 2001:db8::/200 * *", b": rule: '2001:db8::/200': prefix longer"),
        ("smap: rule allow * spammer *", b": rule: sender pattern 'spammer' has no '@'"),
        ("smap: rule reject * * *", b": rule: unknown action 'reject'"),
    ],
)
def test_a_bad_rule_is_421_and_exit_78_naming_file_line_keyword(
    open_dir: Path, line: str, message: bytes
) -> None:
    spool = spool_for_receiver(open_dir)
    table = spool.table
    table.write_text(table.read_text() + line + "\n")
    n = len(table.read_text().splitlines())
    done = subprocess.run(
        [program("smap"), "-t", str(table)], input=b"QUIT\r\n", capture_output=True, timeout=120
    )
    assert done.stdout.startswith(b"421 4.3.0 ")
    assert done.returncode == EX_CONFIG
    assert f"{table}:{n}".encode() + message in done.stderr
    check = spool.smapq("check-config", check=False)
    assert check.returncode == EX_CONFIG
    assert f"{table}:{n}: rule: " in check.stderr
    assert len(check.stderr.splitlines()) == 1


def test_check_config_warns_of_an_open_relay_only_without_policy(open_dir: Path) -> None:
    spool = spool_for_receiver(open_dir)
    before = spool.smapq("check-config", check=False)
    assert "smapq: warning: smap: no domains, recipients or rule:" in before.stderr
    assert "open relay" in before.stderr
    table = spool.table
    table.write_text(table.read_text() + "smap: domains example.com\n")
    after = spool.smapq("check-config", check=False)
    assert "open relay" not in after.stderr
    assert after.returncode == before.returncode  # a warning, not a problem
    assert any(
        line.split()[:3] == ["smap:", "domains", "example.com"]
        for line in after.stdout.splitlines()
    )
