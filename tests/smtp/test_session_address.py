"""RFC 5321 path checks on MAIL FROM and RCPT TO, through the session."""

from __future__ import annotations

import pytest

from smapq.smtp import limits
from smapq.smtp import replies as R
from tests.smtp.sessiondrive import banner, drive, ehlo_reply

START = banner() + ehlo_reply(b"c")

GOOD_SENDERS = [
    (b"<a@b.c>", "a@b.c"),
    (b"<>", ""),
    (b"<first.last+tag@sub.example.org>", "first.last+tag@sub.example.org"),
    (b'<"a b"@c.d>', '"a b"@c.d'),
    (b'<"a\\"b>"@c.d>', '"a\\"b>"@c.d'),
    (b"<a@[127.0.0.1]>", "a@[127.0.0.1]"),
    (b"<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    (b"<@relay.example,@r2.example:a@b.c>", "a@b.c"),
    (b" <a@b.c>", "a@b.c"),  # a space after the colon, as many clients send
    (b"a@b.c", "a@b.c"),  # no angle brackets (old clients)
    (b"<a-b@x-y.example>", "a-b@x-y.example"),
    (b"<!#$%&'*+/=?^_`{|}~@b.c>", "!#$%&'*+/=?^_`{|}~@b.c"),
]


@pytest.mark.parametrize(("path", "mailbox"), GOOD_SENDERS)
def test_good_sender(path: bytes, mailbox: str) -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:" + path + b"\r\nRCPT TO:<x@y.z>\r\nDATA\r\n.\r\n"])
    assert run.envelopes[0].sender == mailbox
    assert run.out.startswith(START + R.R250_SENDER_OK % (b"<" + mailbox.encode() + b">"))


# (path, reply for MAIL, reply for RCPT)
BAD = [
    (b"<a>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@b..c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<.a@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a.@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a..b@c.d>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@-b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@b-.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@b_c.d>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@[1.2.3]>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@[IPv6:zz::1]>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a b@c.d>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@b.c", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@b.c>x", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b'<"a@b.c>', R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@" + b"x" * 64 + b".c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<@:a@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<@-r.example:a@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<@r.example>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a\x01b@c.d>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a@c.d\x7f>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<a\tb@c.d>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<-oQ/tmp/x@b.c>", R.R553_SENDER_DASH, R.R553_RCPT_DASH),
    (b"-oQ/tmp@b.c", R.R553_SENDER_DASH, R.R553_RCPT_DASH),
    (b"<@r.example:-f@b.c>", R.R553_SENDER_DASH, R.R553_RCPT_DASH),
    # Quotes are the only way to a leading "-" or space; both are refused.
    (b'<"-oQ/tmp"@b.c>', R.R553_SENDER_DASH, R.R553_RCPT_DASH),
    (b'<"\\-oQ"@b.c>', R.R553_SENDER_DASH, R.R553_RCPT_DASH),
    (b'<" root"@b.c>', R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b'<"\\ root"@b.c>', R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"< root@b.c>", R.R501_BAD_SENDER, R.R501_BAD_RCPT),
    (b"<\xc3\xa9@b.c>", R.R553_NEED_SMTPUTF8, R.R553_NEED_SMTPUTF8),
    (b"<" + b"a" * 250 + b"@b.cc>", R.R501_PATH_TOO_LONG, R.R501_PATH_TOO_LONG),
    (b"a" * 300 + b"@b.c", R.R501_PATH_TOO_LONG, R.R501_PATH_TOO_LONG),
]


@pytest.mark.parametrize(("path", "mail_reply", "rcpt_reply"), BAD)
def test_bad_address(path: bytes, mail_reply: bytes, rcpt_reply: bytes) -> None:
    run = drive(
        [
            b"EHLO c\r\nMAIL FROM:" + path + b"\r\n"
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:" + path + b"\r\nRCPT TO:<ok@b.c>\r\n"
        ]
    )
    assert run.out == (
        START
        + mail_reply
        + R.R250_SENDER_OK % b"<a@b.c>"
        + rcpt_reply
        + R.R250_RCPT_OK % b"<ok@b.c>"
    )


def test_path_of_256_octets_is_fine() -> None:
    path = b"<" + b"a" * 249 + b"@b.cc>"
    assert len(path) == limits.PATH_MAX
    run = drive([b"EHLO c\r\nMAIL FROM:" + path + b"\r\n"])
    assert run.out == START + R.R250_SENDER_OK % path


def test_null_path_is_not_a_recipient() -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<>\r\n"])
    assert run.out == START + R.R250_SENDER_OK % b"<>" + R.R501_BAD_RCPT


def test_postmaster_needs_no_domain() -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<PostMaster>\r\nRCPT TO:<root>\r\n"])
    assert run.out.endswith(R.R250_RCPT_OK % b"<postmaster>" + R.R501_BAD_RCPT)


def test_smtputf8_allows_utf8_addresses() -> None:
    run = drive(
        [
            "EHLO c\r\nMAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n"
            "RCPT TO:<δοκιμή@παράδειγμα.example>\r\nDATA\r\n.\r\n".encode()
        ]
    )
    (env,) = run.envelopes
    assert env.sender == "jörg@bücher.example"
    assert env.recipients == ["δοκιμή@παράδειγμα.example"]
    assert env.params == {"SMTPUTF8": ""}
    assert env.protocol == "UTF8SMTP"  # RFC 6531 3.7.3: the Received: "with" type


def test_protocol_is_per_transaction() -> None:
    run = drive(
        [
            b"EHLO c\r\nMAIL FROM:<a@b.c> SMTPUTF8\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n"
            b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n"
            b"HELO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n"
        ]
    )
    assert [env.protocol for env in run.envelopes] == ["UTF8SMTP", "ESMTP", "SMTP"]


def test_smtputf8_still_needs_valid_utf8() -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<\xff@b.c> SMTPUTF8\r\n"])
    assert run.out == START + R.R501_BAD_SENDER


PARAMS = [
    (b"SIZE=10", R.R250_SENDER_OK % b"<a@b.c>"),
    (b"size=10 body=7bit", R.R250_SENDER_OK % b"<a@b.c>"),
    (b"SIZE=abc", R.R501_PARAM_SYNTAX),
    (b"SIZE=", R.R501_PARAM_SYNTAX),
    (b"SIZE=1 SIZE=2", R.R501_PARAM_SYNTAX),
    (b"BODY=BINARYMIME", R.R501_PARAM_SYNTAX),
    (b"SMTPUTF8=yes", R.R555_PARAM),
    (b"RET=HDRS", R.R555_PARAM),
    (b"-X=1", R.R501_PARAM_SYNTAX),
]


@pytest.mark.parametrize(("params", "reply"), PARAMS)
def test_mail_parameters(params: bytes, reply: bytes) -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<a@b.c> " + params + b"\r\n"])
    assert run.out == START + reply


def test_parameters_need_ehlo() -> None:
    run = drive([b"HELO c\r\nMAIL FROM:<a@b.c> SIZE=10\r\n"])
    assert run.out.endswith(R.plain(R.R555_PARAM))


def test_rcpt_parameters_are_refused() -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> NOTIFY=NEVER\r\n"])
    assert run.out.endswith(R.R555_PARAM)


@pytest.mark.parametrize("arg", [b"FROM <a@b.c>", b"<a@b.c>", b"", b"TO:<a@b.c>"])
def test_mail_syntax(arg: bytes) -> None:
    run = drive([b"EHLO c\r\nMAIL " + arg + b"\r\n"])
    assert run.out == START + R.R501_MAIL_SYNTAX


@pytest.mark.parametrize("arg", [b"TO <a@b.c>", b"<a@b.c>", b"", b"FROM:<a@b.c>"])
def test_rcpt_syntax(arg: bytes) -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<>\r\nRCPT " + arg + b"\r\n"])
    assert run.out.endswith(R.R501_RCPT_SYNTAX)


# (commands after EHLO, code of the one refusal, the address its event names): the
# reports count refusals per sender / recipient by that address, as messages store it.
REFUSED = [
    (b"MAIL FROM:<a\x1b[31m@b.c>", 501, "a?[31m@b.c"),  # controls shown as "?"
    (b"MAIL FROM:<-oQ/tmp@x>", 553, "-oQ/tmp@x"),
    (b"MAIL FROM:-oQ/tmp@x", 553, "-oQ/tmp@x"),
    (b"MAIL FROM:<@r.example:-f@b.c>", 553, "-f@b.c"),
    (b"MAIL FROM:<a@b.c", 501, "a@b.c"),
    (b"MAIL FROM:<a b@c.d>", 501, "a b@c.d"),
    (b"MAIL FROM:<\xc3\xa9@b.c>", 553, "\xe9@b.c"),
    (b"MAIL FROM:<a@b.c> SIZE=2000", 552, "a@b.c"),
    (b"MAIL FROM:<> SIZE=2000", 552, "<>"),
    (b"MAIL FROM:<@r.example:>", 501, "@r.example:"),  # a route is not the null path
    (b"MAIL FROM:<a@b.c> SIZE=x", 501, "a@b.c"),
    (b"MAIL FROM:<a@b.c> RET=HDRS", 555, "a@b.c"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<-x@y.z>", 553, "-x@y.z"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> NOTIFY=NEVER", 555, "d@e.f"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<>", 501, "<>"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e..f>", 501, "d@e..f"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<r1@e.f>\r\nRCPT TO:<r2@e.f>", 452, "r2@e.f"),
    (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\na\nb\r\n.", 550, "a@b.c"),
    (b"MAIL FROM:<>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + b"x" * 1001 + b"\r\n.", 500, "<>"),
]


@pytest.mark.parametrize(
    ("command", "detail"),
    [
        (b"HELO " + b"h" * 256, "HELO syntax: " + "h" * 256),  # over 255 octets
        (b"EHLO a\x1bb", "EHLO syntax: a?b"),
        (b"EHLO", "EHLO syntax"),
        (b"HELO \xc3\xa9", "HELO syntax: \xe9"),
    ],
)
def test_helo_refusal_names_the_helo_in_the_detail(command: bytes, detail: str) -> None:
    # events.address is for mailboxes (reports count refusals per address).
    run = drive([command + b"\r\n"])
    assert run.session.events[1:] == [("reject", detail, "", 501)]


@pytest.mark.parametrize(("commands", "code", "address"), REFUSED)
def test_refusal_events_name_the_refused_address(commands: bytes, code: int, address: str) -> None:
    run = drive([b"EHLO c\r\n" + commands + b"\r\n"], max_bytes=1024, max_recipients=1)
    (reject,) = [e for e in run.session.events if e[0] == "reject"]
    assert (reject[3], reject[2]) == (code, address)
    assert run.codes()[-1] == code


def test_null_sender_events_say_so() -> None:
    run = drive([b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n.\r\n"])
    assert [(e[0], e[2]) for e in run.session.events if e[0] in ("mail", "accept")] == [
        ("mail", "<>"),
        ("accept", "<>"),
    ]
