"""Queue ids: short, unique, sortable by arrival time, shown in the 250 reply.

Twelve Crockford base32 digits of the microsecond clock, then four of randomness (20
bits): ids sort by receive time like Postfix's long queue ids, and two receivers
accepting in the same microsecond collide with probability 2**-20 (the UNIQUE index
turns that into a retried insert, never a lost message).

Lean: imported by the inetd receiver; stdlib only.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
QUEUE_ID_LEN = 16


def _b32(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_queue_id(now: float | None = None) -> str:
    micros = int((time.time() if now is None else now) * 1_000_000)
    rand = int.from_bytes(os.urandom(3), "big") & 0xFFFFF
    return _b32(micros, 12) + _b32(rand, 4)


def new_session_id() -> str:
    """A session id for the events of one SMTP connection (same shape as a queue id)."""
    return new_queue_id()
