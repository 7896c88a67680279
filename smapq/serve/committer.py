"""Group commit: one writer thread per worker, every waiting message in one transaction.

Purpose: the event loop never waits for the disk.  Connections hand their pending
``Submission`` to ``submit`` and stop reading; the writer thread takes everything
that is queued, commits it through the intake backend in ONE transaction (one fsync
for all of them), and hands the outcomes back to the loop in one call.  While a commit
is on its way to the disk the next batch gathers, so under load many messages share
an fsync, and an idle server commits each message alone without waiting for company.
No 250 is sent before its own message's commit returned: the outcome goes back to
the connection that submitted it, which only then lets the core answer.

Audit rows that belong to no message (``log``) ride along in the same queue, in the
order they were made, so one session's events keep their order in the table.

WAL checkpoints run on a second thread with its own connection (``Checkpointer``),
never inside a commit: a checkpoint costs 5-12 ms here, which as SQLite's automatic
checkpoint would stall every message of the batch that happened to trigger it.

Diagnostics: a backend exception that is not a StoreError (a bug) fails the batch
with 451 and is logged with its stack; the thread survives it.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Protocol

from smapq.intake.port import StoreError
from smapq.receive.logsink import crash_report
from smapq.smtp import replies as R

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable

    from smapq.intake.port import IntakeStore, Submission
    from smapq.store.intake_sqlite import Checkpointer


class Waiter(Protocol):
    """Who gets a submission's outcome (a connection), in the loop's thread."""

    def committed(self, error: StoreError | None) -> None: ...


_STOP = object()
# Messages committed between checkpoint requests (about 1000 WAL pages of 2 KB mail),
# and the longest pause after which whatever was committed is checkpointed anyway.
CHECKPOINT_MESSAGES = 250
CHECKPOINT_IDLE = 2.0


class GroupCommitter:
    """The writer thread of one worker (see the module docstring)."""

    def __init__(
        self,
        store: IntakeStore,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[str], None],
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.store = store
        self.loop = loop
        self.on_error = on_error
        self.outstanding = 0  # submissions whose outcome the loop has not seen (loop side)
        self.batches = 0
        self.committed = 0
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="smapq-commit", daemon=True)
        self._checkpointer = checkpointer
        self._dirty = threading.Event()
        self._ckpt_thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread.start()
        if self._checkpointer is not None:
            self._ckpt_thread = threading.Thread(
                target=self._checkpoints, name="smapq-checkpoint", daemon=True
            )
            self._ckpt_thread.start()

    # --- loop side ---
    def submit(self, sub: Submission, waiter: Waiter) -> None:
        self.outstanding += 1
        self._queue.put((sub, waiter))

    def log(self, sub: Submission) -> None:
        self._queue.put((sub, None))

    def _deliver(
        self, batch: list[tuple[Submission, Waiter | None]], results: list[StoreError | None]
    ) -> None:
        for (sub, waiter), error in zip(batch, results, strict=True):
            if waiter is not None:
                self.outstanding -= 1
                waiter.committed(error)
            elif error is not None:
                self.on_error(
                    f"fwtksyserr: {len(sub.events)} audit events not written: {error.reason}"
                )

    def stop(self) -> None:
        """Commit what is queued, then end both threads (call from the loop's thread
        once nothing will be submitted any more)."""
        self._queue.put(_STOP)
        self._thread.join()
        if self._ckpt_thread is not None:
            self._stopping = True
            self._dirty.set()
            self._ckpt_thread.join()

    # --- writer thread ---
    def _run(self) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        since_checkpoint = 0
        while True:
            first = get()
            stop = first is _STOP
            batch: list[tuple[Submission, Waiter | None]] = [] if stop else [first]  # type: ignore[list-item]
            while not stop:
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                else:
                    batch.append(item)  # type: ignore[arg-type]
            if batch:
                results = self._commit([sub for sub, _ in batch])
                self.batches += 1
                messages = sum(1 for sub, _ in batch if sub.durable)
                self.committed += messages
                since_checkpoint += messages
                if since_checkpoint >= CHECKPOINT_MESSAGES:
                    since_checkpoint = 0
                    self._dirty.set()
                self.loop.call_soon_threadsafe(self._deliver, batch, results)
            if stop:
                return

    def _commit(self, subs: list[Submission]) -> list[StoreError | None]:
        try:
            return self.store.accept(subs)
        except Exception as exc:  # a bug, not a database answer: fail this batch only
            self.loop.call_soon_threadsafe(self.on_error, crash_report(exc))
            error = StoreError(f"internal error: {exc}", R.R451_STORE_FAILED)
            return [error] * len(subs)

    def _checkpoints(self) -> None:
        """Checkpoint when asked (the WAL grew), and after a pause in what was left."""
        assert self._checkpointer is not None
        done_at = 0
        while not self._stopping:
            self._dirty.wait(CHECKPOINT_IDLE)
            self._dirty.clear()
            seen = self.committed
            if seen == done_at:
                continue
            try:
                self._checkpointer.run()
                done_at = seen
            except Exception as exc:  # busy or failed: the next round tries again
                self.loop.call_soon_threadsafe(self.on_error, f"fwtksyserr: checkpoint: {exc}")
        self._checkpointer.close()


class LoopCommitter(GroupCommitter):
    """Experiment: commit in the loop's thread, once per loop iteration."""

    def start(self) -> None:
        self._batch: list[tuple[Submission, Waiter | None]] = []
        self._scheduled = False
        if self._checkpointer is not None:
            self._ckpt_thread = threading.Thread(
                target=self._checkpoints, name="smapq-checkpoint", daemon=True
            )
            self._ckpt_thread.start()

    def submit(self, sub: Submission, waiter: Waiter) -> None:
        self.outstanding += 1
        self._add((sub, waiter))

    def log(self, sub: Submission) -> None:
        self._add((sub, None))

    def _add(self, item: tuple[Submission, Waiter | None]) -> None:
        self._batch.append(item)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._batch = self._batch, []
        if not batch:
            return
        results = self._commit([sub for sub, _ in batch])
        self.batches += 1
        messages = sum(1 for sub, _ in batch if sub.durable)
        self.committed += messages
        self._deliver(batch, results)

    def stop(self) -> None:
        self._flush()
        if self._ckpt_thread is not None:
            self._stopping = True
            self._dirty.set()
            self._ckpt_thread.join()
