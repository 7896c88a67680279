"""Every reply the receiver sends, as a named byte constant.

Purpose: one place for reply codes and texts, so tests compare against names and an
operator can grep a transcript back to its cause.  Templates take bytes via ``%``.

Texts: where FWTK smap had a reply the text is smap's (the seed transcript must work
verbatim); where smap broke RFC 5321 (NOOP 220, EHLO 500, VRFY echo, 550 + exit for
limits) the code follows the RFC and the text follows Postfix.

Enhanced status codes (RFC 2034, RFC 3463) are written into every constant that may
carry one.  RFC 2034 only allows them after the server advertised ENHANCEDSTATUSCODES
in its EHLO reply, so a session that never saw EHLO sends ``plain(reply)``: that is
how ``HELO`` sessions get smap's replies byte for byte.  The greeting, the HELO/EHLO
replies and 354 never carry one.

Standards: RFC 5321 4.2 (reply codes), RFC 2034, RFC 3463, RFC 1870 (SIZE),
RFC 6152 (8BITMIME), RFC 2920 (PIPELINING), RFC 6531 (SMTPUTF8).
"""

from __future__ import annotations

# --- greeting and session -------------------------------------------------------------
R220_BANNER = b"220 %s SMTP/smap Ready.\r\n"  # % hostname
R221_BYE = b"221 2.0.0 Closing connection\r\n"
R421_TIMEOUT = b"421 4.4.2 %s Error: timeout exceeded\r\n"  # % hostname
R421_TOO_MANY_ERRORS = b"421 4.7.0 %s Error: too many errors\r\n"  # % hostname
# % hostname; instead of the banner when the receiver cannot start (config, jail, database)
R421_UNAVAILABLE = b"421 4.3.0 %s Service not available, closing connection\r\n"
R421_LIFETIME = b"421 4.4.2 %s Error: session time limit exceeded\r\n"  # % hostname
R421_SHUTDOWN = b"421 4.3.2 %s Service shutting down, closing connection\r\n"  # % hostname
# Limits at the door (smapq serve), % (hostname, client address): Postfix's texts.
R421_CLIENT_CONNECTIONS = b"421 4.7.0 %s Error: too many connections from %s\r\n"
R421_CLIENT_RATE = b"421 4.7.0 %s Error: too many connections per minute from %s\r\n"
R421_BUSY = b"421 4.7.0 %s Error: too many connections, try again later\r\n"  # % hostname

# --- HELO / EHLO -----------------------------------------------------------------------
R250_HELO = b"250 (%s) pleased to meet you.\r\n"  # % helo argument
# % (hostname, helo argument, SIZE line); the extension lines follow RFC 5321 4.1.1.1.
R250_EHLO = (
    b"250-%s (%s) pleased to meet you.\r\n"
    b"250-%s\r\n"
    b"250-8BITMIME\r\n"
    b"250-PIPELINING\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)
EHLO_SIZE = b"SIZE"  # RFC 1870 4: no number means no fixed limit
EHLO_SIZE_LIMIT = b"SIZE %d"  # % maxbytes
# Appended to the SIZE line when a certificate is configured and TLS is not yet on.
EHLO_STARTTLS = b"\r\n250-STARTTLS"
R501_HELO_SYNTAX = b"501 5.5.4 Syntax: HELO hostname\r\n"
R501_EHLO_SYNTAX = b"501 5.5.4 Syntax: EHLO hostname\r\n"

# --- transaction -----------------------------------------------------------------------
R250_SENDER_OK = b"250 2.1.0 %s... Sender Ok\r\n"  # % <path>
R250_RCPT_OK = b"250 2.1.5 %s OK\r\n"  # % <path>
R354_DATA = b'354 Enter mail, end with "." on a line by itself\r\n'
R250_ACCEPTED = b"250 2.0.0 Mail accepted, queued as %s\r\n"  # % queue id
R250_RESET = b"250 2.0.0 Reset state\r\n"
R250_OK = b"250 2.0.0 OK\r\n"

R501_MAIL_SYNTAX = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
R501_RCPT_SYNTAX = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
R501_DATA_SYNTAX = b"501 5.5.4 Syntax: DATA\r\n"
R501_PARAM_SYNTAX = b"501 5.5.4 Bad MAIL parameter value\r\n"
R501_BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
R501_BAD_RCPT = b"501 5.1.3 Bad recipient address syntax\r\n"
R501_PATH_TOO_LONG = b"501 5.5.4 Path too long\r\n"  # RFC 5321 4.5.3.1.9 wording
R553_SENDER_DASH = b"553 5.1.7 Sender address refused: starts with '-'\r\n"
R553_RCPT_DASH = b"553 5.1.3 Recipient address refused: starts with '-'\r\n"
# The access policy (smapq.intake.policy), % <recipient> where there is one; RFC 3463:
# 5.7.1 delivery not authorized (relaying, rules), 5.1.1 bad destination mailbox.
R550_RELAY_DENIED = b"550 5.7.1 %s: Relay access denied\r\n"
R550_UNKNOWN_RCPT = b"550 5.1.1 %s: Recipient address rejected: user unknown\r\n"
R550_NOTO = b"550 5.7.1 %s: Recipient address rejected: access denied\r\n"
R554_DENIED = b"554 5.7.1 %s: Access denied\r\n"
R554_DENIED_SESSION = b"554 5.7.1 Access denied\r\n"  # MAIL after a deny rule matched
R553_NEED_SMTPUTF8 = b"553 5.6.7 Non-ASCII address requires MAIL FROM SMTPUTF8\r\n"
R555_PARAM = b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"

R503_NEED_MAIL = b"503 5.5.1 need MAIL From: first.\r\n"  # smap's text
R503_NEED_RCPT = b"503 5.5.1 need RCPT first.\r\n"  # smap's text
R503_NESTED_MAIL = b"503 5.5.1 Error: nested MAIL command\r\n"

R452_TOO_MANY_RCPTS = b"452 4.5.3 Error: too many recipients\r\n"
R552_TOO_BIG = b"552 5.3.4 Message size exceeds fixed limit\r\n"

# --- end of DATA refusals (sent only after the final <CRLF>.<CRLF>) ----------------------
R550_BARE_NEWLINE = b"550 5.5.2 Error: bare <CR> or <LF> in message data\r\n"
R500_DATA_LINE_TOO_LONG = b"500 5.5.2 Error: message line longer than 1000 octets\r\n"
# RFC 5322 and RFC 6152 (8BITMIME) allow no NUL in a message; sendmail and the programs
# it feeds may cut the message at one.
R550_NUL = b"550 5.6.0 Error: NUL character in message data\r\n"

# --- storage outcomes (chosen by the driver, sent by the session) ----------------------
R451_STORE_FAILED = b"451 4.3.0 Error: queue file write error, try again later\r\n"
R452_NO_SPACE = b"452 4.3.1 Insufficient system storage\r\n"

# --- STARTTLS (RFC 3207 4; texts as Postfix) -------------------------------------------
R220_STARTTLS = b"220 2.0.0 Ready to start TLS\r\n"
R501_STARTTLS_SYNTAX = b"501 5.5.4 Syntax: STARTTLS\r\n"
R502_NOT_IMPLEMENTED = b"502 5.5.1 Error: command not implemented\r\n"
R554_TLS_ACTIVE = b"554 5.5.1 Error: TLS already active\r\n"

# --- other commands ----------------------------------------------------------------------
R554_SYNC = b"554 5.5.0 Error: SMTP protocol synchronization\r\n"  # Postfix's text
R500_UNRECOGNIZED = b"500 5.5.1 Command unrecognized\r\n"  # smap: "500 Command unrecognized"
R500_COMMAND_TOO_LONG = b"500 5.5.2 Error: command line too long\r\n"
R252_VRFY = b"252 2.5.0 Cannot VRFY user; send mail and delivery will be attempted\r\n"
R501_VRFY_SYNTAX = b"501 5.5.4 Syntax: VRFY address\r\n"
R502_EXPN = b"502 5.5.1 EXPN not available\r\n"
R214_HELP = (
    b"214-2.0.0 Commands\r\n"
    b"214-2.0.0 HELO    EHLO    MAIL    RCPT    DATA\r\n"
    b"214 2.0.0 RSET    NOOP    QUIT    HELP    VRFY    EXPN\r\n"
)


def plain(reply: bytes) -> bytes:
    """Return ``reply`` with the enhanced status code dropped from every line.

    A line looks like ``DDD[- ]C.S.D text``; anything else is returned unchanged.
    """
    out = []
    for line in reply.split(b"\r\n")[:-1]:
        sp = line.find(b" ", 4)
        code = line[4:sp]
        if sp > 4 and code.count(b".") == 2 and code.replace(b".", b"").isdigit():
            out.append(line[:4] + line[sp + 1 :])
        else:
            out.append(line)
    out.append(b"")
    return b"\r\n".join(out)
