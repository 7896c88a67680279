"""The access policy's syntax and matcher: domains, recipients, rules, CIDR, patterns."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smapq.config.policy import Glob, Policy, client_address, parse_network
from smapq.config.settings import loads
from smapq.errors import ConfigError
from smapq.intake.core import Intake, Site
from smapq.intake.policy import client_of, decide
from smapq.smtp import replies as R


def policy(text: str) -> Policy:
    p = loads(text, "t").smap.policy
    assert p is not None
    return p


def verdict(p: Policy, client: str, sender: str, rcpt: str) -> tuple[int, str]:
    """(reply code or 250, event detail)."""
    reply, detail, _deny = decide(p, client_of(client), sender, rcpt)
    return (int(reply[:3]) if reply else 250), detail


# --- domains -----------------------------------------------------------------------


def test_domains_accept_ours_and_refuse_relaying() -> None:
    p = policy("smap: domains Example.COM .example.net\n")
    assert verdict(p, "198.51.100.1", "a@b.c", "u@example.com") == (250, "policy t:1 domains")
    assert verdict(p, "198.51.100.1", "a@b.c", "u@EXAMPLE.com.") == (250, "policy t:1 domains")
    assert verdict(p, "198.51.100.1", "a@b.c", "u@mx.example.net")[0] == 250
    # .example.net is its subdomains, not example.net itself
    assert verdict(p, "198.51.100.1", "a@b.c", "u@example.net") == (
        550,
        "policy t:1 domains: relay access denied",
    )
    assert verdict(p, "198.51.100.1", "a@b.c", "u@notexample.com")[0] == 550
    assert verdict(p, "198.51.100.1", "a@b.c", "u@example.com.evil")[0] == 550


def test_relay_refusal_reply_is_550_5_7_1_naming_the_recipient() -> None:
    p = policy("smap: domains example.com\n")
    reply, _detail, deny = decide(p, None, "a@b.c", "u@elsewhere.org")
    assert reply == R.R550_RELAY_DENIED % b"<u@elsewhere.org>"
    assert reply.startswith(b"550 5.7.1 ")
    assert not deny


@pytest.mark.parametrize("local", ["u%elsewhere.org", "elsewhere.org!u", '"u@elsewhere.org"'])
def test_sender_specified_routing_is_relaying(local: str) -> None:
    p = policy("smap: domains example.com\n")
    assert verdict(p, "", "a@b.c", f"{local}@example.com") == (
        550,
        "policy t:1 domains: sender-specified routing",
    )


def test_bare_postmaster_is_always_ours() -> None:
    p = policy("smap: domains example.com\n")
    assert verdict(p, "", "a@b.c", "postmaster")[0] == 250
    assert verdict(p, "", "a@b.c", "postmaster@elsewhere.org")[0] == 550


def test_domains_from_files_and_several_lines_add_up(tmp_path: Path) -> None:
    listed = tmp_path / "domains"
    listed.write_text("# our domains\nexample.org\n\n.example.org  # and its hosts\n")
    p = policy(f"smap: domains example.com\nsmap: domains {listed}\n")
    for rcpt in ("u@example.com", "u@example.org", "u@a.b.example.org"):
        assert verdict(p, "", "a@b.c", rcpt)[0] == 250, rcpt
    assert verdict(p, "", "a@b.c", "u@example.net")[0] == 550


# --- recipients ----------------------------------------------------------------------


def test_recipients_file_local_parts_and_addresses(tmp_path: Path) -> None:
    valid = tmp_path / "rcpts"
    valid.write_text("alice\nBob@Example.com\n# carol left\n")
    p = policy(f"smap: domains example.com example.org\nsmap: recipients {valid}\n")
    ok = "policy t:2 recipients"
    assert verdict(p, "", "a@b.c", "ALICE@example.org") == (250, ok)
    assert verdict(p, "", "a@b.c", "bob@example.com") == (250, ok)
    unknown = (550, "policy t:2 recipients: user unknown")
    assert verdict(p, "", "a@b.c", "bob@example.org") == unknown
    assert verdict(p, "", "a@b.c", "carol@example.com")[0] == 550
    assert verdict(p, "", "a@b.c", "PostMaster@example.org") == (250, ok)  # RFC 5321 4.5.1
    # the domain check comes first: alice elsewhere is relaying, not an unknown user
    assert verdict(p, "", "a@b.c", "alice@elsewhere.org")[1].endswith("relay access denied")
    reply, _, _ = decide(p, None, "a@b.c", "carol@example.com")
    assert reply == R.R550_UNKNOWN_RCPT % b"<carol@example.com>"
    assert reply.startswith(b"550 5.1.1 ")


# --- rules ---------------------------------------------------------------------------

RELAY = "policy t:1 domains: relay access denied"
RULES = """\
smap: domains example.com
smap: rule allow 10.0.0.0/8,2001:db8:1::/48 * *
smap: rule noto * * *@example.com.invalid
smap: rule deny 192.0.2.0/24 * *
smap: rule noto * *@spam.example *
smap: rule deny 2001:db8::/32 <> *
smap: rule noto * * abuse-*@example.com
"""


@pytest.mark.parametrize(
    ("client", "sender", "rcpt", "code", "detail"),
    [
        # allow: a network that may relay (before the domain check)
        ("10.9.8.7", "a@b.c", "u@gmail.example", 250, "policy t:2 allow"),
        ("::ffff:10.9.8.7", "a@b.c", "u@gmail.example", 250, "policy t:2 allow"),
        ("2001:db8:1:ff::1", "a@b.c", "u@gmail.example", 250, "policy t:2 allow"),
        ("2001:db8:2::1", "a@b.c", "u@gmail.example", 550, RELAY),
        # deny by client network, IPv4 and IPv4-mapped IPv6 alike
        ("192.0.2.55", "a@b.c", "u@example.com", 554, "policy t:4 deny"),
        ("::ffff:192.0.2.55", "a@b.c", "u@example.com", 554, "policy t:4 deny"),
        ("192.0.3.1", "a@b.c", "u@example.com", 250, "policy t:1 domains"),
        # sender pattern, case-insensitive
        ("198.51.100.1", "Bulk@SPAM.example", "u@example.com", 550, "policy t:5 noto"),
        ("198.51.100.1", "bulk@notspam.example", "u@example.com", 250, "policy t:1 domains"),
        # the null sender from an IPv6 network
        ("2001:db8:5::1", "", "u@example.com", 554, "policy t:6 deny"),
        ("2001:db8:5::1", "a@b.c", "u@example.com", 250, "policy t:1 domains"),
        # recipient pattern: noto refuses only those recipients
        ("198.51.100.1", "a@b.c", "abuse-desk@example.com", 550, "policy t:7 noto"),
        ("198.51.100.1", "a@b.c", "desk@example.com", 250, "policy t:1 domains"),
        # first match wins: 10/8 is allowed before the noto of line 3 is reached
        ("10.0.0.1", "a@b.c", "x@example.com.invalid", 250, "policy t:2 allow"),
        ("198.51.100.1", "a@b.c", "x@example.com.invalid", 550, "policy t:3 noto"),
        # an unknown client matches only '*'
        ("", "", "u@example.com", 250, "policy t:1 domains"),
    ],
)
def test_rules_first_match_wins(
    client: str, sender: str, rcpt: str, code: int, detail: str
) -> None:
    assert verdict(policy(RULES), client, sender, rcpt) == (code, detail)


def test_deny_says_so_and_noto_does_not() -> None:
    p = policy(RULES)
    assert decide(p, client_of("192.0.2.1"), "a@b.c", "u@example.com")[2] is True
    assert decide(p, client_of("198.51.100.1"), "a@spam.example", "u@example.com")[2] is False


def test_rules_without_domains_accept_by_default() -> None:
    p = policy("smap: rule noto * * *@elsewhere.org\n")
    assert verdict(p, "192.0.2.1", "a@b.c", "u@anything.example") == (250, "policy default")
    assert verdict(p, "192.0.2.1", "a@b.c", "u@elsewhere.org")[0] == 550


def test_reordering_rules_changes_the_winner() -> None:
    a = policy("smap: rule allow 127.0.0.0/8 * *\nsmap: rule deny * * *\n")
    b = policy("smap: rule deny * * *\nsmap: rule allow 127.0.0.0/8 * *\n")
    assert verdict(a, "127.0.0.1", "a@b.c", "u@x.example")[0] == 250
    assert verdict(b, "127.0.0.1", "a@b.c", "u@x.example")[0] == 554


# --- configuration errors name file:line: keyword -----------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("smap: rule allow 10.0.0.1/8 * *", "host bits set"),
        ("smap: rule allow 10.0.0.0/33 * *", "prefix longer than 32"),
        ("smap: rule allow 2001:db8::/129 * *", "prefix longer than 128"),
        ("smap: rule allow 10.0.0.0/x * *", "bad prefix length"),
        ("smap: rule allow not-a-net * *", "not an IP address or CIDR"),
        ("smap: rule allow ::ffff:10.0.0.0/8 * *", "IPv4-mapped network needs a prefix"),
        ("smap: rule permit * * *", "unknown action 'permit'"),
        ("smap: rule allow * *", "4 arguments"),
        ("smap: rule allow * example.org *", "sender pattern 'example.org' has no '@'"),
        ("smap: rule allow * * <>", "recipient pattern '<>' has no '@'"),
        ("smap: domains exa_mple..com", "not a domain name"),
        ("smap: domains", "takes domain names or files"),
        ("smap: recipients relative/file", "absolute path"),
    ],
)
def test_bad_policy_lines_name_file_line_and_keyword(line: str, message: str) -> None:
    text = "smap: domains example.com\n" + line + "\n"
    if line.startswith("smap: domains"):
        text = line + "\n"
    with pytest.raises(ConfigError) as err:
        loads(text, "/etc/netperm-table")
    number = text.count("\n")
    keyword = line.split()[1]
    assert f"/etc/netperm-table:{number}: {keyword}: " in str(err.value)
    assert message in str(err.value)


def test_a_bad_line_in_a_domains_file_names_that_file(tmp_path: Path) -> None:
    listed = tmp_path / "domains"
    listed.write_text("example.org\n\nnot a domain\n")
    with pytest.raises(ConfigError) as err:
        loads(f"smap: domains {listed}\n", "t")
    assert f"{listed}:3: domains: one name per line" in str(err.value)
    listed.write_text("example.org\n-bad-.example\n")
    with pytest.raises(ConfigError, match=f"{listed}:2: domains: "):
        loads(f"smap: domains {listed}\n", "t")


def test_missing_files_and_recipients_without_domains(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^t:1: domains: cannot read /nonexistent/d: "):
        loads("smap: domains /nonexistent/d\n", "t")
    valid = tmp_path / "rcpts"
    valid.write_text("alice\n")
    with pytest.raises(ConfigError, match="t:1: recipients: needs smap: domains"):
        loads(f"smap: recipients {valid}\n", "t")
    valid.write_text("@example.com\n")
    with pytest.raises(ConfigError, match=f"{valid}:1: recipients: .*is not local@domain"):
        loads(f"smap: domains example.com\nsmap: recipients {valid}\n", "t")


def test_no_policy_keywords_no_policy_and_a_warning() -> None:
    config = loads("smap: maxrecip 5\n")
    assert config.smap.policy is None
    assert any("open relay" in w for w in config.warnings())
    assert not any("open relay" in w for w in loads("smap: domains a.example\n").warnings())


# --- the matcher's pieces, against the standard library --------------------------------


@given(
    st.text(alphabet="ab*@.", max_size=8),
    st.text(alphabet="abAB@.", max_size=10),
)
def test_glob_agrees_with_fnmatch(pattern: str, value: str) -> None:
    import fnmatch

    expected = fnmatch.fnmatchcase(value.lower(), pattern.lower().replace("[", "[[]"))
    assert Glob(pattern).match(value) is expected


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 128),
)
def test_networks_agree_with_ipaddress(
    net_addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
    client: ipaddress.IPv4Address | ipaddress.IPv6Address,
    prefix: int,
) -> None:
    prefix = min(prefix, net_addr.max_prefixlen)
    net = ipaddress.ip_network(f"{net_addr}/{prefix}", strict=False)
    ours = parse_network(str(net))
    parsed = client_address(str(client))
    assert parsed is not None
    mapped = getattr(client, "ipv4_mapped", None)
    plain = mapped or client
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(
        ipaddress.ip_network("::ffff:0:0/96")
    ):
        return  # mapped networks are matched as IPv4, checked below
    assert (parsed in ours) is (plain.version == net.version and plain in net)


def test_mapped_networks_match_as_ipv4() -> None:
    net = parse_network("::ffff:192.0.2.0/120")
    four = client_address("192.0.2.9")
    assert four is not None and four in net
    assert client_address("::ffff:192.0.2.9") == four
    assert client_address("fe80::1%eth0") == client_address("fe80::1")
    assert client_address("unknown") is None


# --- the intake core with a policy: never raises, refused recipients never stored ------

POLICY_TOKENS = [
    b"EHLO c\r\n",
    b"MAIL FROM:<a@b.c>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<x@spam.example>\r\n",
    b"RCPT TO:<u@example.com>\r\n",
    b"RCPT TO:<u@elsewhere.org>\r\n",
    b"RCPT TO:<u%x@example.com>\r\n",
    b"RCPT TO:<abuse-1@example.com>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\nhi\r\n.\r\n",
    b"RSET\r\n",
]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=200)
@given(
    st.lists(st.sampled_from(POLICY_TOKENS), max_size=30),
    st.sampled_from(["192.0.2.9", "10.1.1.1", "::ffff:192.0.2.9", "2001:db8::1", ""]),
)
def test_intake_with_a_policy_stores_only_accepted_recipients(
    tokens: list[bytes], client: str
) -> None:
    site = Site("mx.example.com", 100000, 100, 1000, policy=policy(RULES), strict_sync=False)
    intake = Intake(site, client, 25)
    intake.greeting()
    stored: list[tuple[str, str]] = []
    for token in tokens:
        intake.feed(token)
        while intake.pending is not None:
            sub = intake.pending
            assert sub.message is not None
            stored += [(str(sub.message["mail_from"]), r) for r in sub.recipients]
            intake.committed(None)
    p = policy(RULES)
    for sender, rcpt in stored:  # every stored recipient is one the policy accepts
        assert decide(p, client_of(client), sender, rcpt)[0] == b"", (sender, rcpt)


def test_a_denied_session_ends_at_maxerrors_however_it_loops() -> None:
    site = Site("mx.example.com", 100000, 100, 5, policy=policy(RULES), strict_sync=False)
    intake = Intake(site, "192.0.2.9", 25)
    intake.greeting()
    intake.feed(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\n")
    assert intake.feed(b"RCPT TO:<u@example.com>\r\n") == R.R554_DENIED % b"<u@example.com>"
    replies = [intake.feed(b"MAIL FROM:<a@b.c>\r\n") for _ in range(4)]
    assert replies[:3] == [R.R554_DENIED_SESSION] * 3
    assert replies[3].endswith(R.R421_TOO_MANY_ERRORS % b"mx.example.com")
    assert intake.closed
