"""The intake's SQLite backend: messages committed durably, one transaction per batch.

Purpose: implements the intake port (smapq.intake.port) with stdlib sqlite3 for both
transports.  ``accept(batch)`` writes every submission of the batch -- messages,
recipients, audit events, in order -- in ONE transaction: the inetd receiver passes
one message, ``smapq serve``'s committer every message that finished DATA while the
previous commit was on its way to the disk (group commit).  With ``synchronous=FULL``
in WAL mode the COMMIT is on disk when ``accept`` returns; the core says 250 only
then.  Nothing is written before end of data, so a dropped connection leaves no row.
A batch that fails is retried one submission at a time, so one bad submission fails
alone; a queue id collision (2**-20 per microsecond) takes new ids and retries.

Writers take the cross-process write lock (smapq.store.writelock) around each
transaction, so inetd receivers, serve workers and the deliverer take turns instead
of polling in SQLite's busy handler.  Batches of audit events alone are not mail:
they commit with ``synchronous=NORMAL`` (no fsync; a power loss may drop the last
few, never a message).

Security: runs jailed as the smap uid; the file must already exist (``smapq init``
made it), it is never created here.  SQL comes only from ``rendered.py`` and this
module.

Diagnostics: ``StoreError`` carries the SMTP reply -- 451 4.3.0 when the database is
busy past its timeout or fails otherwise, 452 4.3.1 when the disk (or the database's
page limit) is full -- and a reason for the log.  No exception text reaches the client.

Lean: stdlib only; SQLite (``_sqlite3``) is the one import the receiver must pay for.
"""

from __future__ import annotations

# The C module itself: the sqlite3 package on top of it only adds datetime adapters,
# and importing those (datetime, sqlite3.dbapi2) costs over a millisecond per connection.
import _sqlite3 as sqlite3
import os

from smapq.intake.port import StoreError
from smapq.smtp import replies as R
from smapq.store import rendered
from smapq.store.writelock import LockTimeout, WriteLock

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from smapq.intake.port import Submission

SQLITE_FULL = 13
_ID_RETRIES = 3
# Rows per multi-row INSERT: far below SQLite's 32766 host parameters and its
# compound-select limit (500), whatever the table.
_ROWS_PER_INSERT = 250


class _MultiInsert:
    """A rendered one-row INSERT ... VALUES (:a, :b) as an INSERT of n rows at once.

    One statement per table and batch, not one per row: the writer thread of ``smapq
    serve`` gives up the GIL at every SQLite step, and each time it has to win it back
    from the event loop, so a batch costs a handful of steps instead of dozens.
    """

    __slots__ = ("group", "head", "names", "texts")

    def __init__(self, sql: str) -> None:
        head, sep, values = sql.partition(" VALUES ")
        if not sep:
            raise ValueError(f"not an INSERT ... VALUES statement: {sql[:60]}")
        self.head = head + " VALUES "
        self.names: list[str] = []
        out = []
        i = 0
        while i < len(values):
            ch = values[i]
            if ch == ":":
                j = i + 1
                while j < len(values) and (values[j].isalnum() or values[j] == "_"):
                    j += 1
                self.names.append(values[i + 1 : j])
                out.append("?")
                i = j
            else:
                out.append(ch)
                i += 1
        self.group = "".join(out)
        self.texts: dict[int, str] = {}

    def run(self, cur: sqlite3.Cursor, rows: Sequence[dict[str, object]]) -> None:
        names = self.names
        for start in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[start : start + _ROWS_PER_INSERT]
            n = len(chunk)
            text = self.texts.get(n)
            if text is None:
                text = self.texts[n] = self.head + ",".join([self.group] * n)
            cur.execute(text, [row[name] for row in chunk for name in names])


_MESSAGES = _MultiInsert(rendered.INSERT_MESSAGE)
_RECIPIENTS = _MultiInsert(rendered.INSERT_RECIPIENT_BY_QUEUE_ID)
_EVENTS = _MultiInsert(rendered.INSERT_EVENT)
# Longest wait for the write lock in the inetd receiver before it answers 451: the
# client's own timeout is minutes, a writer holds the lock for milliseconds.
LOCK_WAIT = 60.0


def _classify(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    text = str(exc)
    if code == SQLITE_FULL:
        return StoreError(f"database full: {text}", R.R452_NO_SPACE)
    return StoreError(f"database error: {text}", R.R451_STORE_FAILED)


def _connect(path: str, busy_ms: int) -> sqlite3.Connection:
    """Open ``path`` read-write (never create it) with the receiver's pragmas."""
    conn = sqlite3.connect(
        "file:" + path + "?mode=rw",
        uri=True,
        isolation_level=None,
        timeout=busy_ms / 1000,
        check_same_thread=False,  # serve opens it in one thread, commits in another
    )
    for pragma in rendered.PRAGMAS:
        conn.execute(pragma)
    return conn


def free_space(directory: str) -> int | None:
    """Bytes an unprivileged writer may still use in ``directory`` (the database's)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SqliteIntake:
    """The open queue database of one receiver process (the intake port)."""

    __slots__ = ("conn", "directory", "lock", "lock_wait")

    def __init__(
        self,
        path: str,
        busy_ms: int = rendered.BUSY_TIMEOUT_MS,
        lock_wait: float | None = LOCK_WAIT,
        autocheckpoint: bool = True,
        cache_kib: int = 0,
    ) -> None:
        """Open ``path``; raises StoreError.  ``lock_wait`` None waits for the write
        lock without a bound (any thread); a number bounds it (main thread only).
        ``autocheckpoint`` False leaves WAL checkpoints to a ``Checkpointer``;
        ``cache_kib`` sets the page cache (a long-lived writer keeps its indexes hot)."""
        self.directory = os.path.dirname(path) or "."
        self.lock_wait = lock_wait
        try:
            self.conn = _connect(path, busy_ms)
            if not autocheckpoint:
                self.conn.execute("PRAGMA wal_autocheckpoint = 0")
            if cache_kib:
                self.conn.execute(f"PRAGMA cache_size = {-int(cache_kib)}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}", R.R451_STORE_FAILED) from None
        try:
            self.lock = WriteLock(self.directory)
        except OSError as exc:
            self.conn.close()
            raise StoreError(
                f"cannot open {self.directory} for the write lock: {exc.strerror}",
                R.R451_STORE_FAILED,
            ) from None

    def accept(self, batch: Sequence[Submission]) -> list[StoreError | None]:
        """Commit ``batch``; per submission None (durable) or the StoreError."""
        error: StoreError | None = None
        for _ in range(_ID_RETRIES):
            try:
                self._commit(batch)
            except sqlite3.IntegrityError as exc:
                if "queue_id" in str(exc):
                    for sub in batch:
                        sub.renew_id()
                    continue
                error = _classify(exc)
            except sqlite3.Error as exc:
                error = _classify(exc)
            except LockTimeout:
                error = StoreError(
                    f"queue database busy: no write lock in {self.lock_wait:.0f}s",
                    R.R451_STORE_FAILED,
                )
            else:
                return [None] * len(batch)
            break
        else:
            error = StoreError("no unique queue id after retries", R.R451_STORE_FAILED)
        if len(batch) > 1:  # so that one bad submission fails alone
            return [self.accept([sub])[0] for sub in batch]
        return [error]

    def _commit(self, batch: Sequence[Submission]) -> None:
        durable = any(sub.message is not None for sub in batch)
        conn = self.conn
        self.lock.acquire(self.lock_wait)
        try:
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            messages = [sub.message for sub in batch if sub.message is not None]
            recipients = [
                {"queue_id": sub.message["queue_id"], "position": i, "address": address}
                for sub in batch
                if sub.message is not None
                for i, address in enumerate(sub.recipients)
            ]
            events = [row for sub in batch for row in sub.events]
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                if messages:
                    _MESSAGES.run(cur, messages)
                    _RECIPIENTS.run(cur, recipients)
                if events:
                    _EVENTS.run(cur, events)
                cur.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.rollback()
                raise
            finally:
                cur.close()
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")
        finally:
            self.lock.release()

    def free_space(self) -> int | None:
        return free_space(self.directory)

    def close(self) -> None:
        self.conn.close()
        self.lock.close()


class Checkpointer:
    """WAL checkpoints off the commit path (``smapq serve``): its own connection, so a
    checkpoint (5-12 ms of copying and fsync) runs beside commits, not inside one."""

    __slots__ = ("conn",)

    def __init__(self, path: str, busy_ms: int = rendered.BUSY_TIMEOUT_MS) -> None:
        try:
            self.conn = _connect(path, busy_ms)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}", R.R451_STORE_FAILED) from None

    def run(self) -> tuple[int, int, int]:
        """A PASSIVE checkpoint: (busy, WAL frames, frames checkpointed)."""
        row = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        self.conn.close()
