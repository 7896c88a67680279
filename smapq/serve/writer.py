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

A database server that cannot be reached when the writer starts does not end the
worker (a replaced worker would find it down just the same, and meanwhile clients
would sit in the listen backlog unanswered): the writer says ``down`` and tries again
every ``RETRY_OPEN`` seconds, and the worker answers new sessions 421 4.3.0 at the
banner (a message already handed over gets 451 4.3.0) until the writer says ``up``.
Submissions wait in the worker until then: the writer reads no frame before it is
connected and jailed (it is still root; it only watches for the worker's end of
file), and takes only what the worker sends after ``up``.

Diagnostics: the writer's own failures go to the worker's log as ``fwtksyserr:``.
"""

from __future__ import annotations

import asyncio
import marshal
import os
import select
import socket
import struct
import time
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
_DOWN = -2  # writer -> worker: the database cannot be reached (reason, reply)
_UP = -3  # writer -> worker: connected (and jailed); send submissions
RETRY_OPEN = 1.0  # seconds between a retrying writer's attempts to open its store
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


def _wait_for_end(sock: socket.socket, seconds: float) -> bool:
    """Sleep ``seconds`` unless the worker goes away first (then False).  Bytes that
    arrive meanwhile are dropped unread: nothing is sent before ``up``, and this
    process must not load frames before it is jailed."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        if select.select([sock], [], [], left)[0] and not sock.recv(_READ):
            return False


def _open_retrying(
    sock: socket.socket,
    open_store: Callable[[], tuple[IntakeStore, Checkpointer | None]],
    retry: float,
) -> tuple[IntakeStore, Checkpointer | None] | None:
    """Open the store, trying again every ``retry`` seconds while it is unreachable;
    None when the worker went away first (see "Failure" in the docstring)."""
    said = ""
    while True:
        try:
            opened = open_store()
        except StoreError as exc:
            try:
                if exc.reason != said:  # once per reason: the worker logs each one
                    said = exc.reason
                    sock.sendall(_frame([(_DOWN, exc.reason, exc.reply, None)]))
                if _wait_for_end(sock, retry):
                    continue
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None  # the worker is gone: nobody waits for this store
        try:
            sock.sendall(_frame([(_UP, None, None, None)]))
        except (BrokenPipeError, ConnectionResetError):
            opened[0].close()
            return None
        return opened


def run_writer(
    sock: socket.socket,
    open_store: Callable[[], tuple[IntakeStore, Checkpointer | None]],
    retry: float | None = None,
) -> int:
    """The writer's life (in the forked child); its exit code.  ``open_store`` returns
    the store, jailed by then (a server database connects first, then jails);
    ``retry``: keep trying to open it at this interval while it says StoreError."""
    try:
        if retry is None:
            store, checkpointer = open_store()
        else:
            opened = _open_retrying(sock, open_store, retry)
            if opened is None:
                return 0  # the worker stopped before the database came back
            store, checkpointer = opened
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
        retry: float | None = None,
        on_back: Callable[[], None] = lambda: None,
    ) -> None:
        """``retry``: the writer keeps trying to open an unreachable store (a server
        database) at this interval instead of exiting; submissions are held until it
        says ``up``, and ``down`` is set while it cannot (``on_back`` when it can)."""
        self.open_store = open_store
        self.on_error = on_error
        self.on_lost = on_lost
        self.on_back = on_back
        self.retry = retry
        self.up = retry is None  # the writer takes submissions
        self.down = ""  # why the writer cannot open its store ("" when it can)
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
                code = run_writer(child, self.open_store, self.retry)
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
        if self.down:
            waiter.committed(StoreError(self.down, R.R451_STORE_FAILED))
            return
        token = self._next
        self._next += 1
        self._waiting[token] = (sub, waiter)
        self.outstanding += 1
        self._queue((token, sub.message, list(sub.recipients), list(sub.events)))

    def log(self, sub: Submission) -> None:
        # While the database is down, audit rows of sessions turned away are lost
        # with it (as a writer's failed batch loses them).
        if not self._broken and self._transport is not None and not self.down:
            self._queue((0, None, [], list(sub.events)))

    def _queue(self, item: tuple[object, ...]) -> None:
        """One frame per loop iteration: what every connection handed over meanwhile."""
        self._pending.append(item)
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if not self.up:
            return  # held until the writer says up (or answered 451 when it is down)
        items, self._pending = self._pending, []
        if items and self._transport is not None and not self._broken:
            self._transport.write(_frame(items))

    def _went_down(self, reason: str) -> None:
        """The writer cannot open its store: everything held is answered 451 now."""
        self.up = False
        self.down = reason or "queue database unavailable"
        self.on_error(f"fwtksyserr: queue database unavailable: {reason}; answering 421")
        held, self._pending = self._pending, []
        for item in held:
            token = item[0]
            if isinstance(token, int) and token:
                _, waiter = self._waiting.pop(token)
                self.outstanding -= 1
                waiter.committed(StoreError(self.down, R.R451_STORE_FAILED))

    def _came_up(self) -> None:
        was_down, self.down, self.up = self.down, "", True
        if was_down:
            self.on_back()
        self._flush()

    def _outcomes(self, outcomes: list[tuple[int, str | None, bytes | None, str | None]]) -> None:
        for token, reason, reply, queue_id in outcomes:
            if token == 0:  # the writer could not start
                self.on_error(f"fwtksyserr: queue writer: {reason}")
                continue
            if token == _DOWN:
                self._went_down(reason or "")
                continue
            if token == _UP:
                self._came_up()
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
            if self.up:
                self._flush()
                self._transport.write(_frame([(_STOP, None, [], [])]))
            # else: a writer still trying to connect reads nothing; our end of file
            # stops it (what is held was never sent, and its clients were answered).
            self._transport.close()  # after the frame is sent
            if self._pipe is not None:
                await self._pipe.closed
        if self.pid:
            os.waitpid(self.pid, 0)
