"""Parse and check the path argument of MAIL FROM / RCPT TO.

Purpose: turn ``<local@domain> PARAM=x ...`` into a mailbox and its ESMTP
parameters, or into a reason for refusal.  Every address that later reaches
sendmail's argv passed through ``check_mailbox``.

Security: refuses a mailbox that starts with ``-`` (it would become a sendmail
option; FWTK smapd only skipped such recipients), also inside quotes
(``"-oQ/tmp"@x``), a quoted local part that starts with a space (``" root"@x``:
programs behind sendmail strip quotes and spaces in different ways), any control
character (log and header injection, NUL included), paths longer than RFC 5321
allows, and non-ASCII unless the client announced SMTPUTF8.  Source routes are
accepted and ignored (RFC 5321 3.3).  A path without angle brackets is accepted
up to the first space, as Postfix does by default (strict_rfc821_envelopes = no):
old clients still send it, and it cannot smuggle anything a bracketed one cannot.

Standards: RFC 5321 4.1.2 (Path, Mailbox, Dot-string, Quoted-string, Domain,
address-literal), 4.5.3.1 (sizes), RFC 6531 3.3 (UTF-8 in addresses).

Lean: no ``re``; character classes are checked with ``bytes.translate``.  Address
literals use ``_socket.inet_pton`` (the C module: ``socket`` would import enum).
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton

from smapq.smtp import limits

# Results of check_mailbox / split_path.
OK = 0
SYNTAX = 1
TOO_LONG = 2
DASH = 3
CONTROL = 4
NEED_UTF8 = 5

_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ATEXT = _ALNUM + b"!#$%&'*+-/=?^_`{|}~"  # RFC 5322 3.2.3, used by RFC 5321 Atom
_LDH = _ALNUM + b"-"
_NON_ASCII = bytes(range(0x80, 0x100))
_CONTROLS = bytes(range(0x20)) + b"\x7f"
_ESMTP_KEYWORD = _ALNUM + b"-"


def has_control(data: bytes) -> bool:
    """True when ``data`` holds a C0 control character or DEL."""
    return len(data.translate(None, _CONTROLS)) != len(data)


def split_path(rest: bytes) -> tuple[int, bytes, bytes]:
    """Split the text after ``FROM:``/``TO:`` into (status, path, parameters).

    ``path`` is what stood between the angle brackets (brackets removed).  A path
    without brackets is accepted up to the first space, as Postfix does by default,
    because old clients still send it.
    """
    rest = rest.lstrip(b" ")
    if has_control(rest):
        return CONTROL, b"", b""
    if rest[:1] != b"<":
        sp = rest.find(b" ")
        if sp < 0:
            sp = len(rest)
        if sp == 0 or sp > limits.PATH_MAX - 2:
            return (TOO_LONG if sp else SYNTAX), b"", b""
        return OK, rest[:sp], rest[sp:]
    end = _closing_bracket(rest)
    if end < 0:
        return SYNTAX, b"", b""
    if end + 1 > limits.PATH_MAX:
        return TOO_LONG, b"", b""
    params = rest[end + 1 :]
    if params and params[:1] != b" ":
        return SYNTAX, b"", b""
    return OK, rest[1:end], params


def _closing_bracket(text: bytes) -> int:
    """Index of the ``>`` closing the path in ``text`` (which starts with ``<``)."""
    if b'"' not in text:
        return text.find(b">")
    quoted = escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == 0x5C and quoted:  # backslash
            escaped = True
        elif c == 0x22:  # double quote
            quoted = not quoted
        elif c == 0x3E and not quoted:  # >
            return i
    return -1


def strip_source_route(path: bytes) -> bytes | None:
    """Drop an RFC 5321 A-d-l (``@a,@b:``); None when it is malformed.

    A route needs a mailbox after it: ``<@a:>`` is not the null path ``<>``.
    """
    if path[:1] != b"@":
        return path
    colon = path.find(b":")
    if colon < 0 or colon == len(path) - 1:
        return None
    for hop in path[:colon].split(b","):
        if hop[:1] != b"@" or not _domain_ok(hop[1:], False):
            return None
    return path[colon + 1 :]


def check_mailbox(mailbox: bytes, utf8: bool) -> int:
    """Check an RFC 5321 Mailbox (``local@domain``); returns OK or a reason."""
    if not mailbox:
        return SYNTAX
    if mailbox[:1] == b"-":
        return DASH
    if has_control(mailbox):
        return CONTROL
    if not mailbox.isascii():
        if not utf8:
            return NEED_UTF8
        try:
            mailbox.decode("utf-8")
        except UnicodeDecodeError:
            return SYNTAX
    at = mailbox.rfind(b"@")
    if at <= 0:
        return SYNTAX
    local = mailbox[:at]
    if local[:1] == b'"':
        if not _quoted_ok(local, utf8):
            return SYNTAX
        # Quotes are the one way a space or a leading "-" gets into a mailbox; the
        # programs behind sendmail strip them (and the space) differently, so a
        # quoted local part must not start with either.
        first = local[2:3] if local[1:2] == b"\\" else local[1:2]  # past one escape
        if first == b"-":
            return DASH
        if first == b" ":
            return SYNTAX
    elif not _dot_string_ok(local, utf8):
        return SYNTAX
    domain = mailbox[at + 1 :]
    if domain[:1] == b"[":
        return OK if _literal_ok(domain) else SYNTAX
    return OK if _domain_ok(domain, utf8) else SYNTAX


def _dot_string_ok(local: bytes, utf8: bool) -> bool:
    allowed = _ATEXT + b"." + (_NON_ASCII if utf8 else b"")
    if local.translate(None, allowed):
        return False
    return local[:1] != b"." and local[-1:] != b"." and b".." not in local


def _quoted_ok(local: bytes, utf8: bool) -> bool:
    # RFC 5321 Quoted-string: qtextSMTP is %d32-33 / %d35-91 / %d93-126,
    # quoted-pairSMTP is %d92 %d32-126.
    if len(local) < 2 or local[-1:] != b'"':
        return False
    inner = local[1:-1]
    i = 0
    n = len(inner)
    while i < n:
        c = inner[i]
        if c == 0x5C:
            if i + 1 >= n or not 32 <= inner[i + 1] <= 126:
                return False
            i += 2
            continue
        if c == 0x22 or (c < 32 or c == 127) or (c > 127 and not utf8):
            return False
        i += 1
    return True


def _domain_ok(domain: bytes, utf8: bool) -> bool:
    if not domain or len(domain) > limits.DOMAIN_MAX:
        return False
    allowed = _LDH + (_NON_ASCII if utf8 else b"")
    for label in domain.split(b"."):
        if not label or len(label) > limits.LABEL_MAX or label.translate(None, allowed):
            return False
        if label[:1] == b"-" or label[-1:] == b"-":
            return False
    return True


def _literal_ok(domain: bytes) -> bool:
    # RFC 5321 4.1.3: IPv4, "IPv6:" and General-address-literal forms.
    if len(domain) < 3 or domain[-1:] != b"]":
        return False
    inner = domain[1:-1]
    if inner[:5].upper() == b"IPV6:":
        family, text = AF_INET6, inner[5:]
    else:
        family, text = AF_INET, inner
    try:
        inet_pton(family, text.decode("ascii"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return True


def parse_params(params: bytes) -> dict[str, str] | None:
    """Split ESMTP parameters into an upper-cased keyword -> value dict.

    RFC 5321 4.1.2: esmtp-keyword is ALPHA/DIGIT then ALPHA/DIGIT/"-";
    esmtp-value is %d33-60 / %d62-126 (plus UTF-8 under RFC 6531).  None when
    malformed or when a keyword repeats.
    """
    out: dict[str, str] = {}
    for word in params.split():
        eq = word.find(b"=")
        key = word if eq < 0 else word[:eq]
        value = b"" if eq < 0 else word[eq + 1 :]
        if not key or key.translate(None, _ESMTP_KEYWORD) or key[:1] == b"-":
            return None
        if eq >= 0 and (not value or b"=" in value or has_control(value)):
            return None
        k = key.decode("ascii").upper()
        if k in out:
            return None
        out[k] = value.decode("utf-8", "replace")
    return out
