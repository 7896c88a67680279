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


class SqliteIntake:
    """The open queue database of one receiver process (the intake port)."""

    __slots__ = ("conn", "directory", "lock", "lock_wait")

    def __init__(
        self,
        path: str,
        busy_ms: int = rendered.BUSY_TIMEOUT_MS,
        lock_wait: float | None = LOCK_WAIT,
        autocheckpoint: bool = True,
    ) -> None:
        """Open ``path``; raises StoreError.  ``lock_wait`` None waits for the write
        lock without a bound (any thread); a number bounds it (main thread only).
        ``autocheckpoint`` False leaves WAL checkpoints to a ``Checkpointer``."""
        self.directory = os.path.dirname(path) or "."
        self.lock_wait = lock_wait
        try:
            self.conn = _connect(path, busy_ms)
            if not autocheckpoint:
                self.conn.execute("PRAGMA wal_autocheckpoint = 0")
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
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                for sub in batch:
                    if sub.message is not None:
                        cur.execute(rendered.INSERT_MESSAGE, sub.message)
                        mid = cur.lastrowid
                        cur.executemany(
                            rendered.INSERT_RECIPIENT,
                            [
                                {"message_id": mid, "position": i, "address": a}
                                for i, a in enumerate(sub.recipients)
                            ],
                        )
                    cur.executemany(rendered.INSERT_EVENT, sub.events)
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
        """Bytes an unprivileged writer may still use where the database lives."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

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
