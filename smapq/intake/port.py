"""The storage port of the intake: what the core hands a backend, and what comes back.

Purpose: the intake core (smapq.intake.core) decides what to store and what to answer;
a backend (smapq.store.intake_sqlite today, PostgreSQL next) only commits.  The port
is deliberately small:

  ``accept(batch) -> [StoreError | None, ...]``  commit every ``Submission`` of the
      batch (one transaction where the backend can: group commit) and say, per
      submission, whether it is durable (None) or why not.  A submission with a
      message is durable only when ``accept`` returns None for it: the core answers
      250 after that and never before.
  ``free_space() -> int | None``  bytes free where the queue lives (None when the
      backend cannot tell, e.g. a database on another host).
  ``close()``

Nothing here knows SQL or a dialect: a submission is plain column values.

Security: the rows hold client text already made safe for logs by the session.

Lean: stdlib only; the typing Protocol is for mypy alone.
"""

from __future__ import annotations

from smapq.errors import TempError
from smapq.store.ids import new_queue_id

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Protocol

    EventRow = dict[str, object]

    class IntakeStore(Protocol):
        def accept(self, batch: Sequence[Submission]) -> list[StoreError | None]: ...
        def free_space(self) -> int | None: ...
        def close(self) -> None: ...


class StoreError(TempError):
    """Storing failed; ``reply`` is what the client hears, ``reason`` what we log."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason, reply)
        self.reason = reason


class Submission:
    """What one commit must hold: a message (or none) and audit events, in order.

    ``message`` is the messages row (None for events alone), ``recipients`` its
    addresses in order, ``events`` the event rows to write first-to-last.  The rows in
    ``tagged`` (also in ``events``) belong to the message and carry its queue id.
    ``durable`` is False for events alone: an audit trail, not mail, which a backend
    may commit without waiting for the disk.
    """

    __slots__ = ("events", "message", "recipients", "tagged", "trace")

    def __init__(
        self,
        message: dict[str, object] | None,
        recipients: Sequence[str],
        events: Sequence[EventRow],
        tagged: Sequence[EventRow] = (),
        trace: Callable[[str], str] | None = None,
    ) -> None:
        self.message = message
        self.recipients = recipients
        self.events = events
        self.tagged = tagged
        self.trace = trace

    @property
    def durable(self) -> bool:
        return self.message is not None

    @property
    def queue_id(self) -> str | None:
        return None if self.message is None else str(self.message["queue_id"])

    def renew_id(self) -> None:
        """Give the message a new queue id (after a collision), trace and tags with it."""
        if self.message is None:
            return
        queue_id = new_queue_id()
        self.message["queue_id"] = queue_id
        if self.trace is not None:
            self.message["trace"] = self.trace(queue_id)
        for row in self.tagged:
            row["queue_id"] = queue_id

    def untag(self) -> None:
        """The commit failed: the message's events belong to no stored message."""
        for row in self.tagged:
            row["queue_id"] = None
