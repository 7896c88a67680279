"""STARTTLS in the sans-I/O session: offered, the wait for the handshake, what is
dropped, the reset after it (RFC 3207 4.2), the "with" types (RFC 3848, RFC 6531)."""

from __future__ import annotations

import pytest

from smapq.smtp import replies as R
from smapq.smtp.session import Session

HOST = "mx.example"


def session(strict: bool = True) -> Session:
    s = Session(HOST, strict_sync=strict)
    s.tls_offered = True
    s.greeting()
    return s


def test_ehlo_offers_starttls_only_with_a_certificate_and_before_tls() -> None:
    plain = Session(HOST)
    plain.greeting()
    assert b"STARTTLS" not in plain.feed(b"EHLO c\r\n")
    assert plain.feed(b"STARTTLS\r\n") == R.R502_NOT_IMPLEMENTED
    s = session()
    assert b"250-STARTTLS\r\n" in s.feed(b"EHLO c\r\n")
    assert s.feed(b"STARTTLS\r\n") == R.R220_STARTTLS
    assert s.tls_wait
    assert s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384") == b""
    ehlo = s.feed(b"EHLO c\r\n")
    assert b"STARTTLS" not in ehlo and ehlo.endswith(b"250 SMTPUTF8\r\n")
    assert s.feed(b"STARTTLS\r\n") == R.R554_TLS_ACTIVE


@pytest.mark.parametrize("cut", range(1, 40))
def test_plaintext_behind_starttls_is_dropped_wherever_the_reads_split(cut: int) -> None:
    s = session()
    s.feed(b"EHLO c\r\n")
    data = b"STARTTLS\r\nRSET\r\nMAIL FROM:<x@y.z>\r\n"
    out = s.feed(data[:cut]) + s.feed(data[cut:])
    assert out == R.R220_STARTTLS  # nothing after it was answered ...
    s.tls_started("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    # ... nor remembered: no sender, no EHLO (plain replies: RFC 2034 needs EHLO)
    assert s.feed(b"RCPT TO:<d@e.f>\r\n") == R.plain(R.R503_NEED_MAIL)
    kinds = [e[0] for e in s.events]
    assert "mail" not in kinds and kinds.count("tls") == 1


def test_the_handshake_forgets_helo_and_the_transaction() -> None:
    s = session()
    s.feed(b"EHLO before\r\n")
    s.feed(b"MAIL FROM:<a@b.c>\r\n")
    s.feed(b"RCPT TO:<d@e.f>\r\n")
    assert s.feed(b"STARTTLS\r\n") == R.R220_STARTTLS
    s.tls_started("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
    assert s.feed(b"DATA\r\n") == R.plain(R.R503_NEED_MAIL)
    s.feed(b"EHLO after\r\n")
    s.feed(b"MAIL FROM:<a@b.c>\r\n")
    s.feed(b"RCPT TO:<d@e.f>\r\n")
    s.feed(b"DATA\r\n")
    s.feed(b"hi\r\n.\r\n")
    assert s.pending is not None
    assert (s.pending.helo, s.pending.protocol) == ("after", "ESMTPS")
    assert ("tls", "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256", "", 220) in s.events


def test_with_types_over_tls() -> None:
    def protocol(hello: bytes, params: bytes) -> str:
        s = session(strict=False)
        s.feed(b"EHLO c\r\nSTARTTLS\r\n")
        s.tls_started("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        s.feed(hello + b" c\r\nMAIL FROM:<a@b.c>" + params + b"\r\nRCPT TO:<d@e.f>\r\n")
        s.feed(b"DATA\r\nhi\r\n.\r\n")
        assert s.pending is not None
        return s.pending.protocol

    assert protocol(b"EHLO", b"") == "ESMTPS"
    assert protocol(b"EHLO", b" SMTPUTF8") == "UTF8SMTPS"
    assert protocol(b"HELO", b"") == "SMTP"  # as Postfix: HELO sessions stay SMTP


def test_a_failed_handshake_ends_the_session() -> None:
    s = session()
    s.feed(b"EHLO c\r\n")
    s.feed(b"STARTTLS\r\n")
    assert s.feed(b"\x16\x03\x01garbage") == b""  # not read as commands meanwhile
    s.tls_failed("WRONG_VERSION_NUMBER")
    assert s.closed
    assert ("tls", "handshake failed: WRONG_VERSION_NUMBER", "", 0) in s.events
    assert s.events[-1] == ("disconnect", "TLS handshake failed", "", 0)


def test_starttls_syntax() -> None:
    s = session()
    s.feed(b"EHLO c\r\n")
    assert s.feed(b"STARTTLS please\r\n") == R.R501_STARTTLS_SYNTAX
    assert not s.tls_wait
