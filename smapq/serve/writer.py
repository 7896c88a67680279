"""Group commit in a writer process: one per worker, every waiting message in one commit.

Purpose: the event loop never waits for the disk and never shares a GIL with the code
that does.  Each worker forks one writer process that owns the queue database: after
the worker's jail for an SQLite file; for PostgreSQL before it, and the writer
connects and then enters the same jail itself (the chroot hides the server's socket
and libpq's files).  A writer that loses its server answers 451 and connects again
on a later batch (smapq.store.intake_postgresql).

Connections hand their pending ``Submission`` to ``submit`` and stop reading; the writer
takes every submission that has arrived, commits them through the intake backend in ONE
transaction (one fsync for all of them) and sends the outcomes back in one frame.  While
a commit is on its way to the disk the next batch gathers, so under load many messages
share an fsync, and an idle server commits each message alone without waiting for
company.  No 250 is sent before its own message's commit returned: the outcome goes back
to the connection that submitted it, which only then lets the core answer.

Why a process and not a thread: measured here, a writer thread spent a quarter of the
worker's CPU in futex wake-ups and context switches handing the GIL back and forth with
the event loop (SQLite releases it at every step).  A process costs one frame each way
per batch and runs on the other core.

Audit rows that belong to no message (``log``) go down the same pipe in the order they
were made, so one session's events keep their order in the table.  WAL checkpoints run
in the writer between batches, when no submission waits, or after many commits even
under load, never inside a commit.

The frames: a 4-byte length and a ``marshal`` dump (plain dicts, lists, bytes and
numbers; no code is ever loaded), between two processes of the same program, uid and
jail (nothing else can reach the socketpair).

Failure: if the writer dies, every outstanding submission gets 451 and the worker
stops (the supervisor replaces it); if the worker dies, the writer sees end of file
and exits without committing what it had not committed yet (those clients never got
250; the messages are theirs to send again).

Diagnostics: the writer's own failures go to the worker's log as ``fwtksyserr:``.
"""

from __future__ import annotations

import asyncio
import marshal
import os
import select
import socket
import struct
from typing import TYPE_CHECKING, Any, Protocol

from smapq.intake.port import StoreError, Submission
from smapq.smtp import replies as R
from smapq.store.intake_sqlite import Checkpointer, SqliteIntake

if TYPE_CHECKING:
    from collections.abc import Callable

    from smapq.intake.port import IntakeStore

_LEN = struct.Struct("!I")
_READ = 1 << 20
_STOP = -1  # token of the frame that asks the writer to finish and exit
# Messages after which the writer checkpoints even when it is never idle (about 10 MB
# of WAL for 2 KB mail: the WAL file keeps its largest size for reuse), and the pause
# after which whatever was committed since the last checkpoint is checkpointed.
CHECKPOINT_MESSAGES = 1000
CHECKPOINT_IDLE = 1.0
# The writer's page cache: every index's hot pages stay in memory (SQLite's default,
# 2 MB, let the fourteen B-trees of three tables push each other out).
CACHE_KIB = 65536


class Waiter(Protocol):
    """Who gets a submission's outcome (a connection), in the loop's thread."""

    def committed(self, error: StoreError | None) -> None: ...


def _frame(obj: Any) -> bytes:
    data = marshal.dumps(obj)
    return _LEN.pack(len(data)) + data


class _Frames:
    """Cuts a byte stream into frames and loads them."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[object]:
        buf = self.buf
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            # Only this program's other process can write here (see the docstring).
            out.append(marshal.loads(buf[pos + 4 : pos + 4 + n]))  # noqa: S302
            pos += 4 + n
        del buf[:pos]
        return out


# --- the writer process ------------------------------------------------------------


def _submission(
    message: dict[str, object] | None, rcpts: list[str], events: list[dict[str, object]]
) -> Submission:
    """Rebuild a submission on the writer's side, able to take a new queue id."""
    if message is None:
        return Submission(None, (), events)
    old = str(message["queue_id"])
    trace = str(message["trace"])
    tagged = [row for row in events if row["queue_id"] == old]
    return Submission(message, rcpts, events, tagged, lambda qid: trace.replace(old, qid))


def sqlite_opener(path: str) -> Callable[[], tuple[IntakeStore, Checkpointer | None]]:
    """The writer's SQLite store and its checkpointer (opened in the jail, by path)."""

    def open_store() -> tuple[IntakeStore, Checkpointer | None]:
        store = SqliteIntake(path, lock_wait=None, autocheckpoint=False, cache_kib=CACHE_KIB)
        return store, Checkpointer(path)

    return open_store


def run_writer(
    sock: socket.socket, open_store: Callable[[], tuple[IntakeStore, Checkpointer | None]]
) -> int:
    """The writer's life (in the forked child); its exit code.  ``open_store`` returns
    the store, jailed by then (a server database connects first, then jails)."""
    try:
        store, checkpointer = open_store()
    except Exception as exc:
        why = exc.reason if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
        answer = exc.reply if isinstance(exc, StoreError) else R.R451_STORE_FAILED
        sock.sendall(_frame([(0, why, answer, None)]))
        return 75
    frames = _Frames()
    since_checkpoint = 0
    while True:
        wait = CHECKPOINT_IDLE if since_checkpoint and checkpointer else None
        if not select.select([sock], [], [], wait)[0]:
            assert checkpointer is not None
            checkpointer.run()  # idle: checkpoint what the last commits left
            since_checkpoint = 0
            continue
        items: list[tuple[int, dict[str, object] | None, list[str], list[dict[str, object]]]]
        items = []
        stop = False
        while True:  # everything that has arrived is one batch
            data = sock.recv(_READ)
            if not data:
                store.close()  # the worker is gone: nothing of an unanswered batch is kept
                return 0
            for frame in frames.feed(data):
                for item in frame:  # type: ignore[attr-defined]
                    if item[0] == _STOP:
                        stop = True
                    else:
                        items.append(item)
            if frames.buf:
                continue  # a frame is cut short: read the rest of it
            if stop or not select.select([sock], [], [], 0)[0]:
                break  # (after STOP only the end of file follows)
        if items:
            subs = [_submission(m, r, e) for _, m, r, e in items]
            results = store.accept(subs)
            out = []
            for (token, _, _, _), sub, error in zip(items, subs, results, strict=True):
                if token:
                    reason: str | None = None if error is None else error.reason
                    reply: bytes | None = None if error is None else error.reply
                    out.append((token, reason, reply, sub.queue_id))
            if out:
                sock.sendall(_frame(out))
            since_checkpoint += sum(1 for sub in subs if sub.durable)
        if stop:
            if checkpointer is not None:
                checkpointer.run()
            store.close()
            return 0
        if since_checkpoint >= CHECKPOINT_MESSAGES and checkpointer is not None:
            checkpointer.run()
            since_checkpoint = 0


# --- the worker's side ---------------------------------------------------------------


class _Pipe(asyncio.Protocol):
    def __init__(self, owner: ProcessCommitter) -> None:
        self.owner = owner
        self.frames = _Frames()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        for frame in self.frames.feed(data):
            self.owner._outcomes(frame)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost()
        if not self.closed.done():
            self.closed.set_result(None)


class ProcessCommitter:
    """The worker's handle on its writer process (see the module docstring)."""

    def __init__(
        self,
        open_store: Callable[[], tuple[IntakeStore, Checkpointer | None]],
        on_error: Callable[[str], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.open_store = open_store
        self.on_error = on_error
        self.on_lost = on_lost
        self.outstanding = 0
        self.pid = 0
        self._sock: socket.socket | None = None
        self._transport: asyncio.Transport | None = None
        self._waiting: dict[int, tuple[Submission, Waiter]] = {}
        self._next = 1
        self._broken = False
        self._stopping = False
        self._pipe: _Pipe | None = None
        self._pending: list[tuple[object, ...]] = []

    def fork(self, inherited: list[socket.socket]) -> None:
        """Start the writer (before the loop runs: the child must not inherit a live
        loop's threads).  ``inherited``: the listening sockets, which the writer must
        not hold open (a listener kept alive by it would queue connections that no
        worker ever accepts once the workers stop)."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            for sock in inherited:
                sock.close()
            code = 70
            try:
                code = run_writer(child, self.open_store)
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self._sock = parent

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        transport, pipe = await loop.connect_accepted_socket(lambda: _Pipe(self), self._sock)
        self._transport = transport
        self._pipe = pipe

    def submit(self, sub: Submission, waiter: Waiter) -> None:
        if self._broken or self._transport is None:
            waiter.committed(StoreError("the queue writer is gone", R.R451_STORE_FAILED))
            return
        token = self._next
        self._next += 1
        self._waiting[token] = (sub, waiter)
        self.outstanding += 1
        self._queue((token, sub.message, list(sub.recipients), list(sub.events)))

    def log(self, sub: Submission) -> None:
        if not self._broken and self._transport is not None:
            self._queue((0, None, [], list(sub.events)))

    def _queue(self, item: tuple[object, ...]) -> None:
        """One frame per loop iteration: what every connection handed over meanwhile."""
        self._pending.append(item)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        if items and self._transport is not None and not self._broken:
            self._transport.write(_frame(items))

    def _outcomes(self, outcomes: list[tuple[int, str | None, bytes | None, str | None]]) -> None:
        for token, reason, reply, queue_id in outcomes:
            if token == 0:  # the writer could not start
                self.on_error(f"fwtksyserr: queue writer: {reason}")
                continue
            sub, waiter = self._waiting.pop(token)
            self.outstanding -= 1
            if reason is None:
                if queue_id is not None and sub.message is not None:
                    sub.message["queue_id"] = queue_id  # a collision gave it a new id
                waiter.committed(None)
            else:
                waiter.committed(StoreError(reason, reply or R.R451_STORE_FAILED))

    def _lost(self) -> None:
        if self._stopping:
            return
        self._broken = True
        self.on_error("fwtksyserr: the queue writer died; the worker stops")
        waiting, self._waiting = self._waiting, {}
        for _, waiter in waiting.values():
            self.outstanding -= 1
            waiter.committed(StoreError("the queue writer died", R.R451_STORE_FAILED))
        self.on_lost()

    async def stop(self) -> None:
        """Everything is answered: let the writer commit the last audit rows and exit."""
        self._stopping = True
        if self._transport is not None and not self._broken:
            self._flush()
            self._transport.write(_frame([(_STOP, None, [], [])]))
            self._transport.close()  # after the frame is sent
            if self._pipe is not None:
                await self._pipe.closed
        if self.pid:
            os.waitpid(self.pid, 0)
