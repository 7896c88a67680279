"""The intake's PostgreSQL backend: messages committed durably, one transaction per batch.

Purpose: implements the intake port (smapq.intake.port) with psycopg 3 for both
transports when ``smap: database`` is a ``postgresql+psycopg://`` URL.  ``accept(batch)``
writes every submission of the batch -- messages, recipients, audit events -- in ONE
transaction (group commit in ``smapq serve``'s writer), with one multi-row INSERT per
table, and ``NOTIFY smapq_queue`` in the same commit so deliverers listening on the
channel pick the mail up at once (PostgreSQL delivers a notification only when its
transaction commits, and folds identical ones).  The transaction sets ``SET LOCAL
synchronous_commit = on`` whenever it holds a message, so the COMMIT is durable (and
waits for a synchronous standby, if the server has one) even where the server's or
the database's default is off; batches of audit events alone commit with it off, as
the SQLite backend commits them without an fsync.  The core says 250 only after
``accept`` returned None for the message, i.e. after COMMIT returned.

Least privilege: the statements need INSERT on messages, recipients and events and
USAGE on their sequences, nothing else -- no SELECT (so no ``INSERT ... RETURNING``):
message ids are taken beforehand with ``nextval()`` on the id sequence (found once
per connection with ``pg_get_serial_sequence``) and inserted explicitly, so the
recipients can name their message without reading it back.

Failures: ``StoreError`` carries the SMTP reply and a log reason.  Disk full (SQLSTATE
53100) answers 452 4.3.1; everything else, the server going away included, answers
451 4.3.0 -- also when the connection drops during COMMIT, whose outcome is then
unknown (the client sends again; at worst the message is queued twice, never lost).
A queue id collision (unique violation on queue_id) takes new ids and retries.  A
lost connection (or a server that became read-only: a standby after failover) is
dropped, and the next batch connects again, so intake recovers by itself once the
server is back; attempts are at most one per ``RECONNECT_PAUSE``.  ``statement_timeout``
and TCP keepalives bound how long a stuck server or a dead host can hold a session.

Security: connect before the jail (``smapq.store.intake_open``): the chroot hides
Unix sockets, /etc (name resolution, passwd) and libpq's files.  The first
connection's user, password (from the URL, the passfile or the service file) and
server address are kept in memory, so reconnecting inside the jail needs none of
those files; TLS files named by sslrootcert/sslcert/sslkey are read again at each
connect and must then exist at the same path inside the jail.

Diagnostics: the reason of a StoreError is the libpq/server message, first line.

Not lean: psycopg is imported only when the URL names PostgreSQL (~100 ms); an SQLite
receiver never imports this module.
"""

from __future__ import annotations

import ipaddress
import os
import time
from typing import TYPE_CHECKING

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from smapq.intake.port import StoreError
from smapq.smtp import replies as R
from smapq.store import faults, rendered

if TYPE_CHECKING:
    from collections.abc import Sequence

    from smapq.intake.port import Submission

    Conn = psycopg.Connection[tuple[object, ...]]
    Params = dict[str, str | int | None]

# The deliverers LISTEN here (smapq.store.listen); the same as
# smapq.store.dialects.postgresql.CHANNEL (a test checks), which imports SQLAlchemy.
CHANNEL = "smapq_queue"
STATEMENT_TIMEOUT_MS = 30000
CONNECT_TIMEOUT = 10
RECONNECT_PAUSE = 1.0
APPLICATION_NAME = "smap"
# TCP settings for a server that vanishes without a reset (host down, cable cut):
# noticed within about tcp_user_timeout / keepalives instead of the kernel's hours.
_TCP = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": str(STATEMENT_TIMEOUT_MS),
}
_ID_RETRIES = 3
_ROWS_PER_INSERT = 500  # x 17 columns: far below the protocol's 65535 parameters
_GONE_CLASSES = ("08", "57", "53")  # connection, operator intervention, resources


def _columns(insert: str) -> tuple[str, ...]:
    """The column list of a rendered ``INSERT INTO t (a, b) VALUES ...``."""
    head = insert.partition(" VALUES ")[0]
    return tuple(c.strip() for c in head[head.index("(") + 1 : head.rindex(")")].split(","))


# The columns the lean receiver's SQLite INSERTs write, from the same definition
# (smapq.store.queries via rendered.py); ids are added here.
MESSAGE_COLUMNS = _columns(rendered.INSERT_MESSAGE)
EVENT_COLUMNS = _columns(rendered.INSERT_EVENT)
RECIPIENT_COLUMNS = ("message_id", "position", "address")


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL (``postgresql+psycopg://``) as libpq takes it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL: {scheme}://")
    return "postgresql://" + rest


def is_socket_path(params: Params) -> bool:
    """True when libpq would connect through a Unix socket (no host, or a directory)."""
    if params.get("hostaddr"):
        return False
    hosts = str(params.get("host") or "").split(",")
    return any(not h or h.startswith(("/", "@")) for h in hosts)


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- the statements (every one a named function: HACKING.md) -----------------------


def sql_sequence() -> str:
    return "SELECT pg_get_serial_sequence('messages', 'id')"


def sql_begin(durable: bool, sequence: str, ids: int) -> str:
    """BEGIN, the commit's durability and ``ids`` new message ids: one round trip."""
    text = f"BEGIN; SET LOCAL synchronous_commit = {'on' if durable else 'off'}"
    if ids:
        literal = "'" + sequence.replace("'", "''") + "'"
        text += f"; SELECT nextval({literal}) FROM generate_series(1, {int(ids)})"
    return text


def sql_insert(table: str, columns: Sequence[str], rows: int) -> str:
    """INSERT of ``rows`` rows at once."""
    group = "(" + ", ".join(["%s"] * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([group] * rows)


def sql_notify() -> str:
    return f"NOTIFY {CHANNEL}"


def sql_commit() -> str:
    return "COMMIT"


def sql_session(timeout_ms: int) -> str:
    return f"SET statement_timeout = {int(timeout_ms)}"


# --------------------------------------------------------------------------------------


class _Stale(Exception):
    """A kept connection turned out dead at the batch's first statement."""


class PostgresIntake:
    """One receiver process's connection to the queue on PostgreSQL (the intake port)."""

    __slots__ = ("conn", "next_try", "params", "sequence", "timeout_ms")

    def __init__(
        self,
        url: str,
        timeout_ms: int = STATEMENT_TIMEOUT_MS,
        connect_timeout: int = CONNECT_TIMEOUT,
    ) -> None:
        """Connect now (before the jail); raises StoreError with a 421 reply."""
        try:
            params: Params = conninfo_to_dict(libpq_url(url))
        except (ValueError, psycopg.Error) as exc:
            raise StoreError(f"bad database URL: {exc}", R.R421_UNAVAILABLE) from None
        # The environment's PG* variables apply, as for every libpq program.
        if "PGCONNECT_TIMEOUT" not in os.environ:
            params.setdefault("connect_timeout", str(connect_timeout))
        if "PGAPPNAME" not in os.environ:
            params.setdefault("application_name", APPLICATION_NAME)
        for key, value in _TCP.items():
            params.setdefault(key, value)
        self.params = params
        self.timeout_ms = timeout_ms
        self.conn: Conn | None = None
        self.sequence = ""
        self.next_try = 0.0
        try:
            self.conn = self._connect()
        except StoreError as exc:
            raise StoreError(exc.reason, R.R421_UNAVAILABLE) from None
        self._pin(self.conn)

    def _connect(self) -> Conn:
        try:
            conn = psycopg.connect(make_conninfo("", **self.params), autocommit=True)
        except psycopg.Error as exc:
            self.next_try = time.monotonic() + RECONNECT_PAUSE
            raise StoreError(
                f"cannot connect to the queue database: {faults.reason(exc)}",
                R.R451_STORE_FAILED,
            ) from None
        try:
            conn.execute(sql_session(self.timeout_ms))
            row = conn.execute(sql_sequence()).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(
                f"queue database not ready (run 'smapq init'?): {faults.reason(exc)}",
                R.R451_STORE_FAILED,
            ) from None
        if row is None or not row[0]:
            conn.close()
            raise StoreError("messages.id has no sequence", R.R451_STORE_FAILED)
        self.sequence = str(row[0])
        return conn

    def _pin(self, conn: Conn) -> None:
        """Keep what libpq looked up for the first connection (see the docstring): from
        the service file, the passfile, PG* variables, /etc/hosts and DNS."""
        info, params = conn.info, self.params
        params.pop("service", None)
        params.pop("passfile", None)
        params.setdefault("host", info.host)
        params.setdefault("port", str(info.port))
        params.setdefault("dbname", info.dbname)
        params.setdefault("user", info.user)
        if info.password and "password" not in params:
            params["password"] = info.password
        host = str(params.get("host") or "")
        if "," not in host and not is_socket_path(params) and not _numeric(host):
            hostaddr = getattr(info, "hostaddr", "")
            if hostaddr:
                params.setdefault("hostaddr", hostaddr)

    def _connection(self) -> tuple[Conn, bool]:
        """The open connection, or a new one (then True)."""
        conn = self.conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        self._drop()
        if time.monotonic() < self.next_try:
            raise StoreError("queue database unavailable (reconnecting)", R.R451_STORE_FAILED)
        self.conn = conn = self._connect()
        return conn, True

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:  # noqa: SIM105
                conn.close()
            except psycopg.Error:
                pass

    def _fault(self, exc: psycopg.Error) -> StoreError:
        """The reply for ``exc``; a connection that cannot go on is dropped."""
        conn = self.conn
        state = getattr(exc, "sqlstate", None) or ""
        kind = faults.kind(exc)
        if (
            conn is None
            or conn.closed
            or conn.broken
            or not state
            or state.startswith(_GONE_CLASSES)
            or kind == faults.READONLY
        ):
            self._drop()
        elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            try:
                conn.execute("ROLLBACK")
            except psycopg.Error:
                self._drop()
        reply = R.R452_NO_SPACE if kind == faults.FULL else R.R451_STORE_FAILED
        return StoreError(faults.describe(exc), reply)

    def accept(self, batch: Sequence[Submission]) -> list[StoreError | None]:
        """Commit ``batch``; per submission None (durable) or the StoreError."""
        error: StoreError
        for _ in range(_ID_RETRIES):
            try:
                conn, fresh = self._connection()
                self._commit(conn, fresh, batch)
            except StoreError as exc:
                error = exc
            except _Stale:
                # The server closed our idle connection (it restarted): nothing was
                # sent for this batch yet, so a new connection can take it at once.
                self._drop()
                continue
            except pgerrors.UniqueViolation as exc:
                error = self._fault(exc)
                if "queue_id" in (exc.diag.constraint_name or "") + str(exc):
                    for sub in batch:
                        sub.renew_id()
                    continue
            except psycopg.Error as exc:
                error = self._fault(exc)
            else:
                return [None] * len(batch)
            break
        else:
            error = StoreError("no unique queue id after retries", R.R451_STORE_FAILED)
        if len(batch) > 1 and self.conn is not None:  # so that one bad submission fails alone
            return [self.accept([sub])[0] for sub in batch]
        return [error] * len(batch)

    def _commit(self, conn: Conn, fresh: bool, batch: Sequence[Submission]) -> None:
        messages = [sub for sub in batch if sub.message is not None]
        events = [[row[c] for c in EVENT_COLUMNS] for sub in batch for row in sub.events]
        with conn.cursor() as cur:
            try:
                cur.execute(sql_begin(bool(messages), self.sequence, len(messages)))
            except psycopg.OperationalError:
                if fresh or not conn.broken:
                    raise
                raise _Stale from None
            ids: list[object] = []
            if messages:
                cur.nextset()
                cur.nextset()
                ids = [row[0] for row in cur.fetchall()]
            rows: list[list[object]] = []
            rcpts: list[list[object]] = []
            for id_, sub in zip(ids, messages, strict=True):
                message = sub.message
                assert message is not None
                rows.append([id_, *[message[c] for c in MESSAGE_COLUMNS]])
                rcpts.extend([id_, i, a] for i, a in enumerate(sub.recipients))
            # The rest in one round trip: a statement that fails makes the server skip
            # the ones after it (COMMIT included) and the pipeline raises its error.
            with conn.pipeline():
                _insert(cur, "messages", ("id", *MESSAGE_COLUMNS), rows)
                _insert(cur, "recipients", RECIPIENT_COLUMNS, rcpts)
                _insert(cur, "events", EVENT_COLUMNS, events)
                if messages:
                    cur.execute(sql_notify())
                cur.execute(sql_commit())

    def free_space(self) -> int | None:
        return None  # the server's disk: it says 53100 when full

    def close(self) -> None:
        self._drop()


def _insert(
    cur: psycopg.Cursor[tuple[object, ...]],
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[object]],
) -> None:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        cur.execute(sql_insert(table, columns, len(chunk)), [v for row in chunk for v in row])
