"""The receiver's side of the queue: one SQLite transaction per accepted message.

Purpose: open the queue database by its path inside the jail (stdlib sqlite3, the
pragmas of ``smapq.store.rendered``) and commit a message, its recipients and its
audit events in ONE transaction.  The caller says 250 only after ``accept`` returned,
i.e. after COMMIT with ``synchronous=FULL`` in WAL mode: the message is then on disk.
Nothing is written before that, so a dropped connection leaves no row.

Security: runs jailed as the smap uid; the file must already exist (``smapq init``
made it), it is never created here.  SQL comes only from ``rendered.py``.

Diagnostics: ``StoreError`` carries the SMTP reply -- 451 4.3.0 when the database is
busy past its timeout or fails otherwise, 452 4.3.1 when the disk (or the database's
page limit) is full -- and a reason for the log.  No exception text reaches the client.

Lean: stdlib only; SQLite (``_sqlite3``) is the one import the receiver must pay for.
"""

from __future__ import annotations

# The C module itself: the sqlite3 package on top of it only adds datetime adapters,
# and importing those (datetime, sqlite3.dbapi2) costs over a millisecond per connection.
import _sqlite3 as sqlite3

from smapq.errors import TempError
from smapq.smtp import replies as R
from smapq.store import rendered
from smapq.store.ids import new_queue_id

try:  # the builtin sha256 saves OpenSSL's ~2 ms start-up that hashlib pays
    from _sha256 import sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.12 renamed it
    from hashlib import sha256

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from smapq.smtp.session import Envelope

    EventRow = dict[str, object]

SQLITE_FULL = 13
_ID_RETRIES = 3  # a queue id collision (2**-20 per microsecond) just takes a new id


class StoreError(TempError):
    """Storing failed; ``reply`` is what the client hears, ``reason`` what we log."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason, reply)
        self.reason = reason


def _classify(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    text = str(exc)
    if code == SQLITE_FULL:
        return StoreError(f"database full: {text}", R.R452_NO_SPACE)
    return StoreError(f"database error: {text}", R.R451_STORE_FAILED)


class Queue:
    """The open queue database of one receiver process."""

    __slots__ = ("conn",)

    def __init__(self, path: str, busy_ms: int = rendered.BUSY_TIMEOUT_MS) -> None:
        """Open ``path`` read-write (never create it); raises StoreError."""
        try:
            self.conn = sqlite3.connect(
                "file:" + path + "?mode=rw", uri=True, isolation_level=None, timeout=busy_ms / 1000
            )
            for pragma in rendered.PRAGMAS:
                self.conn.execute(pragma)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}", R.R451_STORE_FAILED) from None

    def accept(
        self,
        env: Envelope,
        message: dict[str, object],
        events: Sequence[EventRow],
        tagged: Sequence[EventRow],
        trace: Callable[[str], str],
        now: float,
    ) -> str:
        """Commit ``env`` as a new ``received`` message; returns its queue id.

        ``message`` holds the session columns (session_id, client_addr, client_port,
        client_name).  ``events`` are rows for INSERT_EVENT, written in their order;
        those of them also in ``tagged`` (this message's own events) get the new queue
        id, and lose it again when the transaction fails.  ``trace(queue_id)`` makes
        the Received: header.
        """
        row = dict(message)
        row.update(
            state="received",
            received_at=now,
            helo=env.helo or None,
            protocol=env.protocol,
            mail_from=env.sender,
            size=env.size,
            body=env.body,
            body_sha256=sha256(env.body).hexdigest(),
            next_attempt_at=now,
            updated_at=now,
        )
        for _ in range(_ID_RETRIES):
            queue_id = new_queue_id(now)
            row["queue_id"] = queue_id
            row["trace"] = trace(queue_id)
            for e in tagged:
                e["queue_id"] = queue_id
            try:
                self._insert(row, env.recipients, events)
            except sqlite3.Error as exc:
                for e in tagged:
                    e["queue_id"] = None
                if isinstance(exc, sqlite3.IntegrityError) and "queue_id" in str(exc):
                    continue
                raise _classify(exc) from None
            return queue_id
        raise StoreError("no unique queue id after retries", R.R451_STORE_FAILED)

    def _insert(
        self, row: dict[str, object], rcpts: list[str], events: Sequence[EventRow]
    ) -> None:
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(rendered.INSERT_MESSAGE, row)
            mid = cur.lastrowid
            cur.executemany(
                rendered.INSERT_RECIPIENT,
                [{"message_id": mid, "position": i, "address": a} for i, a in enumerate(rcpts)],
            )
            cur.executemany(rendered.INSERT_EVENT, events)
            cur.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.rollback()
            raise
        finally:
            cur.close()

    def log(self, events: Sequence[EventRow]) -> None:
        """Commit audit events that belong to no stored message (refusals, the end).

        They are an audit trail, not mail: written with synchronous=NORMAL so they cost
        no fsync (a power loss may drop the last few, never a message).
        """
        if not events:
            return
        try:
            self.conn.execute("PRAGMA synchronous = NORMAL")
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(rendered.INSERT_EVENT, events)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.rollback()
            raise _classify(exc) from None
        finally:
            self.conn.execute("PRAGMA synchronous = FULL")

    def close(self) -> None:
        self.conn.close()
