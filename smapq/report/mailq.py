"""``smapq queue list`` for people: the queue as ``mailq`` / ``postqueue -p`` shows it.

Purpose: one block per message -- a line with queue id, status, size, age and sender;
the last delivery result in parentheses, as postqueue prints the deferral reason; then
the recipients still to be delivered, under the sender -- and a closing line with the
count and total size, or ``Mail queue is empty``. Programs use ``--format json|csv``,
which carry the same facts as columns (see ``smapq.report.queue.list_messages``).

Statuses: ``received`` (waiting for its first try), ``deferred`` (waiting for a retry),
``delivering``, ``held``, and with ``--all`` also ``delivered`` and ``bad``.

Security: every cell goes through ``output.cell``, which turns control characters from
the network into ``?``; lines are cut to the width in terminal cells.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, TextIO

from smapq.report.output import GAP, Report, cell, fit, pad
from smapq.report.timespec import human_bytes, human_duration
from smapq.store import states

# Indexes into a queue-list row (smapq.report.queue.list_messages).
QID, STATE, AGE, SIZE, ATT, NRCPT, SENDER = 0, 1, 3, 4, 5, 6, 7
STATUS, DUE, RESULT, PENDING = 10, 11, 12, 13
WIDTHS = (("QUEUE_ID", 16), ("STATUS", 10), ("SIZE", 6), ("AGE", 6))


def _head(width: int) -> str:
    parts = [pad(title, w) for title, w in WIDTHS[:2]]
    parts += [pad(title, w, right=True) for title, w in WIDTHS[2:]]
    return fit(GAP.join([*parts, "SENDER / RECIPIENTS"]), width)


def _indent() -> int:
    return sum(w for _, w in WIDTHS) + len(GAP) * len(WIDTHS)


def _reason(row: Any, now: float) -> str:
    """``(attempt 2, next try in 9m: 451 4.3.0 try again later)``, or ''."""
    bits = []
    if row[ATT]:
        bits.append(f"attempt {row[ATT]}")
    if row[STATUS] == "deferred" and row[DUE] is not None and row[DUE] > now:
        bits.append(f"next try in {human_duration(row[DUE] - now)}")
    text = ", ".join(bits)
    if row[RESULT]:
        text = f"{text}: {row[RESULT]}" if text else str(row[RESULT])
    return f"({text})" if text else ""


def write(report: Report, out: TextIO, width: int, now: float) -> None:
    """The mailq listing of ``report`` (a queue-list report) on ``out``."""
    room = width if width > 0 else 10**9
    indent = _indent()
    count = 0
    size = 0
    statuses: Counter[str] = Counter()
    for row in report.rows:
        if count == 0:
            out.write(_head(room).rstrip() + "\n")
        count += 1
        size += int(row[SIZE] or 0)
        statuses[str(row[STATUS])] += 1
        fixed = [
            pad(cell("text", row[QID]), WIDTHS[0][1]),
            pad(str(row[STATUS]), WIDTHS[1][1]),
            pad(cell("bytes", row[SIZE]), WIDTHS[2][1], right=True),
            pad(cell("duration", row[AGE]), WIDTHS[3][1], right=True),
        ]
        line = GAP.join([*fixed, ""])
        out.write(fit(line + cell("text", row[SENDER]), room) + "\n")
        reason = _reason(row, now)
        if reason:
            out.write(fit("  " + cell("text", reason), room) + "\n")
        pending = [str(a) for a in row[PENDING]]
        for address in pending:
            out.write(fit(" " * indent + cell("text", address), room) + "\n")
        done = int(row[NRCPT] or 0) - len(pending)
        if done:
            word = "delivered" if row[STATE] != "bad" else "done"
            out.write(fit(" " * indent + f"(+{done} recipient(s) {word})", room) + "\n")
        out.write("\n")
    if count == 0:
        waiting = report.extra.get("states") == list(states.WAITING)
        out.write("Mail queue is empty\n" if waiting else "No messages match\n")
        return
    parts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    out.write(f"-- {human_bytes(size)} in {count} message(s) ({parts})\n")
