"""The receiver's SQL, rendered from ``smapq.store.queries`` for stdlib sqlite3.

Purpose: the inetd receiver runs on every SMTP connection and cannot import
SQLAlchemy (270+ ms), yet all SQL is defined once, from the one schema.  These strings
are ``queries.receiver_sql()`` (SQLite dialect, named parameters), written by
``python -m smapq.store.render > smapq/store/rendered.py``; ``--check`` and
tests/receive/test_receive_rendered.py fail when the two differ.  Do not edit by hand.

Also here: the connection pragmas the receiver sets, the same as
``smapq.store.dialects.sqlite`` sets for SQLAlchemy writers (the test checks that too).

Lean: constants only, stdlib-free.
"""

from __future__ import annotations

INSERT_MESSAGE = (
    "INSERT INTO messages (queue_id, state, received_at, session_id, client_addr, "
    "client_port, client_name, helo, protocol, mail_from, size, trace, body, "
    "body_sha256, next_attempt_at, updated_at) VALUES (:queue_id, :state, "
    ":received_at, :session_id, :client_addr, :client_port, :client_name, :helo, "
    ":protocol, :mail_from, :size, :trace, :body, :body_sha256, :next_attempt_at, "
    ":updated_at)"
)

INSERT_RECIPIENT_BY_QUEUE_ID = (
    "INSERT INTO recipients (message_id, position, address) VALUES ((SELECT "
    "messages.id \nFROM messages \nWHERE messages.queue_id = :queue_id), :position, "
    ":address)"
)

INSERT_EVENT = (
    "INSERT INTO events (at, kind, session_id, queue_id, client_addr, address, code, "
    "detail) VALUES (:at, :kind, :session_id, :queue_id, :client_addr, :address, "
    ":code, :detail)"
)

# synchronous=FULL: a COMMIT is on disk before the receiver says 250 (in WAL mode,
# NORMAL can lose a commit on power loss).  journal_mode=WAL is persistent in the file:
# ``smapq init`` (smapq.store.engine) set it, so the receiver does not pay a schema read
# before its banner to assert it again.  temp_store: the jail has no /tmp.
PRAGMAS = (
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA temp_store = MEMORY",
)
BUSY_TIMEOUT_MS = 5000
