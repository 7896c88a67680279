"""STARTTLS for the inetd receiver: TLS over plain file descriptors.

Purpose: ``MemoryTls`` runs TLS over memory buffers for the inetd receiver, which owns
no socket object, only fd 0/1, with the context of smapq.config.tls (``smapq serve``
hands that context to its event loop's ``start_tls`` instead).  The protocol
decisions (when STARTTLS is offered, what is discarded, the reset) are the session's
(smapq.smtp.session); this module only does the handshake and the records.

Security: the session has already dropped what the client pipelined behind STARTTLS
before the first byte reaches OpenSSL here; a failed handshake or a bad record
raises ``TlsError`` carrying OpenSSL's alert, which the receiver sends and closes.

Standards: RFC 3207 (SMTP STARTTLS), RFC 8446 (TLS 1.3), RFC 5246 (TLS 1.2).

Lean: ``ssl`` is imported when the first ``MemoryTls`` is made, long after the
receiver loaded it for its context (smapq.config.tls) before the jail.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl


READ_SIZE = 65536


class TlsError(Exception):
    """The TLS layer failed (handshake or a record); the session ends."""


class MemoryTls:
    """TLS over memory buffers: the transport moves the bytes, this moves the records."""

    __slots__ = ("_incoming", "_obj", "_outgoing", "_ssl", "eof")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        import ssl  # noqa: PLC0415  (already loaded by server_context)

        self._ssl = ssl
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.eof = False  # the client sent close_notify

    @property
    def version(self) -> str:
        return self._obj.version() or ""

    @property
    def cipher(self) -> str:
        info = self._obj.cipher()
        return info[0] if info else ""

    def handshake(self, data: bytes) -> tuple[bool, bytes]:
        """Feed received ``data``; (done, bytes to send).  Raises ``TlsError``."""
        if data:
            self._incoming.write(data)
        ssl = self._ssl
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False, self._outgoing.read()
        except (ssl.SSLError, ValueError) as exc:
            # Send the alert OpenSSL queued, then give up (the caller closes).
            raise TlsError(_reason(exc), self._outgoing.read()) from None
        return True, self._outgoing.read()

    def decrypt(self, data: bytes) -> tuple[bytes, bytes]:
        """Received records -> (plaintext, bytes to send back); plaintext may be empty."""
        self._incoming.write(data)
        ssl = self._ssl
        chunks = []
        while True:
            try:
                chunk = self._obj.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
            except ssl.SSLError as exc:
                raise TlsError(_reason(exc), self._outgoing.read()) from None
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        return b"".join(chunks), self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        """Plaintext -> records to send."""
        self._obj.write(data)
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        """The close_notify alert to send before closing (RFC 8446 6.1); b"" if the
        TLS layer cannot make one any more."""
        ssl = self._ssl
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # ours is queued; the client's answer is not waited for
        except (ssl.SSLError, ValueError, OSError):
            return b""
        return self._outgoing.read()


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)[:200]
