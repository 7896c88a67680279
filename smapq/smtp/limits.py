"""SMTP protocol limits, each with the RFC section that sets it.

Purpose: the one place the state machine (smapq.smtp.session) and its drivers take
numeric limits from.  Site policy (maxbytes, maxrecip, timeout) comes from the
netperm-table and is passed to the session; these are the protocol's own bounds.

Security: every limit here bounds memory or time a remote client can make the
receiver spend before authentication of anything.

Standards: RFC 5321 section 4.5.3 (sizes and timeouts), RFC 1035 2.3.4 (labels).
"""

from __future__ import annotations

# RFC 5321 4.5.3.1.4: a command line, verb and <CRLF> included, is at most 512 octets.
COMMAND_LINE_MAX = 512

# RFC 5321 4.5.3.1.6: a text line, <CRLF> included, is at most 1000 octets.  The
# content of an (unstuffed) body line may therefore hold 998 octets.
TEXT_LINE_MAX = 1000
TEXT_LINE_CONTENT_MAX = TEXT_LINE_MAX - 2

# RFC 5321 4.5.3.1.3: a reverse- or forward-path, angle brackets included, is at
# most 256 octets.  This also bounds the local part (4.5.3.1.1, 64) loosely: real
# VERP/SRS senders exceed 64, and Postfix does not enforce it either.
PATH_MAX = 256

# RFC 5321 4.5.3.1.2: a domain is at most 255 octets; RFC 1035 2.3.4: a label 63.
DOMAIN_MAX = 255
LABEL_MAX = 63

# RFC 5321 4.5.3.1.8: a server must accept at least 100 recipients per message.
# The operator's maxrecip may be lower; the receiver notes that, it does not refuse.
RECIPIENTS_MIN = 100

# RFC 5321 4.5.3.2.7: the server should wait at least 5 minutes for the next command.
COMMAND_TIMEOUT = 300.0

# Not in an RFC: client errors (5xx replies to commands) tolerated before the session
# answers 421 and closes (Postfix smtpd_soft_error_limit is 10, the hard one 20).
ERROR_LIMIT = 10

# Not in an RFC: NOOP/RSET/VRFY/EXPN/HELP/HELO/EHLO allowed before each further one
# also counts as an error (Postfix smtpd_junk_command_limit, which leaves HELO out: it
# logs no event per HELO, this receiver does).  Restarts after each accepted message.
JUNK_COMMAND_LIMIT = 100

# Not in an RFC: RCPTs refused past maxrecip before each further one also counts as an
# error (Postfix smtpd_recipient_overshoot_limit).  Restarts after each accepted message.
RECIPIENT_OVERSHOOT = 1000

# FWTK 2.1 logged client text with %.512s; the audit log does the same.
LOG_TEXT_MAX = 512
