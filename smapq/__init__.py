"""smapq: the TIS FWTK sendmail wrapper (smap + smapd) with a database as the spool.

This package imports nothing at start-up: the inetd receiver pays every import on
every SMTP connection.
"""

__version__ = "0.1.0"
