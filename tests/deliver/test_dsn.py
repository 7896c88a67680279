"""The DSN builder on its own: status codes, diagnostics, and what any input renders to.

Each rendered notice is parsed back with Python's email package, as a mail client
would; the property test feeds it hostile addresses, sendmail output and headers.
"""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smapq.deliver import dsn
from smapq.deliver.dsn import DELAYED, FAILED

NOW = 1_800_000_000.0


def render(
    entries: list[dsn.Entry],
    headers: bytes | None = b"Subject: hi\r\n\r\nbody\r\n",
    action: str = FAILED,
    sender: str = "s@example.org",
) -> EmailMessage:
    report = dsn.Report(
        action, "mx.example", "QID", sender, NOW - 100, NOW, entries, headers, NOW + 999
    )
    raw = dsn.render(report, "NEWQID", NOW)
    assert raw.endswith(b"\r\n")
    assert all(len(line) <= dsn.LINE_MAX for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects
    return msg


def entry(address: str, code: int | None, result: str, action: str = FAILED) -> dsn.Entry:
    e = dsn.status_of(action, code, result)
    e.address = address
    return e


def blocks(msg: EmailMessage) -> list[Message]:
    part = list(msg.iter_parts())[1]
    assert part.get_content_type() == "message/delivery-status"
    payload = part.get_payload()
    assert isinstance(payload, list)
    return payload


# --- status and diagnostic --------------------------------------------------------

SYSEXITS = [
    (64, "5.3.0"),
    (65, "5.6.0"),
    (67, "5.1.1"),
    (68, "5.1.2"),
    (69, "5.3.0"),
    (73, "5.2.0"),
    (76, "5.5.0"),
    (77, "5.7.0"),
    (78, "5.3.5"),
    (1, "5.3.0"),  # not a sysexits code
    (255, "5.3.0"),
]


@pytest.mark.parametrize(("code", "status"), SYSEXITS)
def test_exit_codes_map_like_postfix(code: int, status: str) -> None:
    e = dsn.status_of(FAILED, code, f"exit {code}")
    assert e.status == status
    assert e.diagnostic == f"x-unix; exit {code}"


@pytest.mark.parametrize(("code", "status"), [(75, "4.3.0"), (71, "4.3.0"), (74, "4.3.0")])
def test_a_delay_always_has_a_temporary_class(code: int, status: str) -> None:
    assert dsn.status_of(DELAYED, code, f"exit {code}").status == status


def test_an_smtp_reply_in_the_output_is_the_diagnostic_and_the_status() -> None:
    out = (
        "exit 65 (EX_DATAERR): msmtp: recipient address bob@x not accepted by the server"
        " | msmtp: server message: 550 5.1.1 <bob@x>: Recipient address rejected"
        " | msmtp: could not send mail"
    )
    e = dsn.status_of(FAILED, 65, out)
    assert e.status == "5.1.1"
    assert e.diagnostic == "smtp; 550 5.1.1 <bob@x>: Recipient address rejected"
    # A reply whose class does not fit the report keeps the diagnostic, not the status.
    e = dsn.status_of(FAILED, 65, "exit 65 (EX_DATAERR): 451 4.7.1 try later")
    assert (e.status, e.diagnostic) == ("5.6.0", "smtp; 451 4.7.1 try later")
    # Postfix's pipe(8) convention: output that starts with a status code.
    assert dsn.status_of(FAILED, 70, "exit 70 (EX_SOFTWARE): 5.2.2 mailbox full").status == (
        "5.2.2"
    )


def test_no_status_is_taken_from_numbers_that_are_not_replies() -> None:
    e = dsn.status_of(FAILED, 67, "exit 67 (EX_NOUSER): 1550 5.1.10 version 2.5.0.1 | 10.0.0.1")
    assert e.status == "5.1.1"
    assert e.diagnostic is not None and e.diagnostic.startswith("x-unix; ")


def test_expiry_refusal_and_no_exit_code() -> None:
    e = dsn.status_of(FAILED, 75, "gave up after 9 attempts in 432000s: exit 75", expired=True)
    assert e.status == "4.4.7"
    assert dsn.status_of(FAILED, None, "refused: recipient '-x' starts with '-'").status == (
        "5.1.3"
    )
    assert dsn.status_of(FAILED, None, "message body missing from the queue").status == "5.3.0"
    assert dsn.status_of(DELAYED, None, "killed by signal SIGKILL").status == "4.3.0"
    assert dsn.status_of(FAILED, None, "").diagnostic is None


# --- the message ------------------------------------------------------------------


def test_report_fields_per_message_and_per_recipient() -> None:
    rcpts = [entry(a, 67, "exit 67", DELAYED) for a in ("a@x", "b@y")]
    msg = render(rcpts, action=DELAYED)
    first, *rcpts = blocks(msg)
    assert first["Reporting-MTA"] == "dns; mx.example"
    assert first["Arrival-Date"] == dsn.rfc5322_date(NOW - 100)
    assert [r["Final-Recipient"] for r in rcpts] == ["rfc822; a@x", "rfc822; b@y"]
    for r in rcpts:
        assert (r["Action"], r["Status"]) == ("delayed", "4.1.1")
        assert r["Last-Attempt-Date"] == dsn.rfc5322_date(NOW)
        assert r["Will-Retry-Until"] == dsn.rfc5322_date(NOW + 999)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert msg["Date"] == dsn.rfc5322_date(NOW)
    assert msg["Message-ID"] == f"<NEWQID.{int(NOW)}@mx.example>"


def test_a_huge_address_is_folded_not_left_over_the_line_limit() -> None:
    msg = render([entry("\U0001f600" * 300 + "@x", 67, "exit 67")])  # render checks lines
    assert blocks(msg)[1]["Final-Recipient"].startswith("utf-8; \\x{1F600}")


def test_headers_only_cut_at_a_line_end() -> None:
    many = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(2000))
    msg = render([entry("a@x", 67, "exit 67")], headers=many + b"\r\nthe body\r\n")
    part = list(msg.iter_parts())[2]
    returned = part.get_payload(decode=True)
    assert isinstance(returned, bytes)
    assert len(returned) <= dsn.HEADERS_MAX
    assert returned.endswith(b"\r\n") and many.startswith(returned)
    assert b"the body" not in returned


def test_a_message_without_a_body_left_is_reported_without_headers() -> None:
    msg = render([entry("a@x", None, "message body missing from the queue")], headers=None)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain",
        "message/delivery-status",
    ]


def test_non_ascii_headers_and_addresses_are_8bit_and_the_report_stays_7bit() -> None:
    msg = render(
        [entry("j\u00fcrgen@b\u00fccher.example", 67, "exit 67")],
        headers="Subject: Gr\u00fc\u00dfe\r\n\r\n".encode(),
        sender="\u00e9lodie@example.org",
    )
    text, _, headers = msg.iter_parts()
    assert text["Content-Transfer-Encoding"] == "8bit"
    assert headers["Content-Transfer-Encoding"] == "8bit"
    [_, rcpt] = blocks(msg)
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{FC}rgen@b\\x{FC}cher.example"
    # RFC 6532: the header carries the UTF-8 address as it is (no encoded-word may
    # stand in an addr-spec).
    raw = dsn.render(
        dsn.Report(FAILED, "mx", "Q", "\u00e9lodie@example.org", NOW, NOW, [], None), "N", NOW
    )
    assert "\r\nTo: <\u00e9lodie@example.org>\r\n".encode() in raw


ADDRESS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1)
OUTPUT = st.text(max_size=3000)
HEADERS = st.binary(max_size=3000)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(ADDRESS, OUTPUT), min_size=1, max_size=4), HEADERS, ADDRESS)
def test_any_input_renders_a_wellformed_report(
    rcpts: list[tuple[str, str]], headers: bytes, sender: str
) -> None:
    entries = [entry(a, 67, out) for a, out in rcpts]
    msg = render(entries, headers=headers, sender=sender)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    report = list(msg.iter_parts())[1].as_bytes()
    assert report.isascii()
    got = [b["Final-Recipient"] for b in blocks(msg)[1:]]
    short = [i for i, (a, _) in enumerate(rcpts) if len(a) < 80]  # longer ones may fold
    assert [_address(got[i]) for i in short] == [rcpts[i][0] for i in short]
    for block in blocks(msg)[1:]:
        assert re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", block["Status"])
        assert len(block["Diagnostic-Code"] or "") <= dsn.DIAG_MAX + 20


def _address(field: str) -> str:
    kind, _, value = field.partition("; ")
    if kind == "rfc822":
        return value
    assert kind == "utf-8"
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m.group(1), 16)), value)
