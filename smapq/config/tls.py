"""The STARTTLS server context, built from ``smap: tlscert`` and ``smap: tlskey``.

Purpose: ``server_context(smap)`` makes the one ``ssl.SSLContext`` of a receiver
process (the inetd receiver, each ``smapq serve`` worker); ``smapq serve`` and
``check-config`` build it too, so a bad pair stops them with the same message.

Security: the certificate and key are read as root before the jail: OpenSSL reads
both files inside ``load_cert_chain`` and keeps the key in memory, so the key file
never has to be readable from inside the jail (check-config says so when it is).
TLS 1.2 and 1.3 only; TLS 1.2 suites are Mozilla's "intermediate" list (ECDHE with
AES-GCM or ChaCha20-Poly1305, all AEAD with forward secrecy), so the client's order
wins as the guidelines advise; TLS 1.3 suites are OpenSSL's (all AEAD).  A client
refused here falls back to plaintext on port 25 (RFC 3207 allows nothing else).

Session tickets: the inetd receiver asks for none (``tickets=False``), since every
connection is a new process with a new ticket key and a ticket could never be
redeemed; ``smapq serve`` sends one TLS 1.3 ticket per full handshake, redeemable
while the same worker process lives.  One, not OpenSSL's default two, as Postfix's
smtpd does (tls_server.c: SSL_CTX_set_num_tickets(ctx, 1)): a mail client opens one
connection at a time to a host and a resumed session gets a fresh ticket, so a
second ticket only costs the server an encryption and the client a record.

Standards: RFC 3207 (SMTP STARTTLS), RFC 8446 (TLS 1.3), RFC 5246 (TLS 1.2).

Diagnostics: a certificate or key that cannot be loaded is a ``ConfigError`` naming
the table's file:line, the keyword (tlscert or tlskey) and the file.

Lean: importing this module costs nothing; ``ssl`` is imported by ``server_context``
only, so a receiver without a certificate never loads OpenSSL's libssl.
"""

from __future__ import annotations

from smapq.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl

    from smapq.config.settings import SmapSettings

# Mozilla server-side TLS guidelines 6.0, "intermediate", TLS 1.2 suites.
CIPHERS_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def _where(smap: SmapSettings, keyword: str) -> tuple[str, int]:
    path, _, line = smap.origin[keyword].rpartition(":")
    return path, int(line) if line.isdigit() else 0


def _bad(smap: SmapSettings, keyword: str, message: str) -> ConfigError:
    path, line = _where(smap, keyword)
    return ConfigError(message, path, line, keyword)


def server_context(smap: SmapSettings, tickets: bool = True) -> ssl.SSLContext:
    """The STARTTLS server context; raises ``ConfigError`` naming the bad file."""
    import ssl  # noqa: PLC0415  (only a receiver with a certificate pays for OpenSSL)

    cert, key = smap.tlscert, smap.tlskey
    assert cert is not None and key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 1 if tickets else 0
    for keyword, path in (("tlscert", cert), ("tlskey", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise _bad(smap, keyword, f"cannot read {path}: {exc.strerror}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            raise _bad(smap, "tlskey", f"{key} does not match the certificate {cert}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
        except (ssl.SSLError, OSError):
            raise _bad(smap, "tlscert", f"{cert} is not a PEM certificate ({reason})") from None
        raise _bad(smap, "tlskey", f"{key} is not a PEM private key ({reason})") from None
    return ctx
