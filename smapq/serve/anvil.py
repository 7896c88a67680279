"""Connection counts per client, shared by every worker of one ``smapq serve``.

Purpose: the limits at the door -- sessions in all (``maxsessions``), sessions per
client (``maxperclient``) and new connections per client per minute (``clientrate``)
-- must hold for the whole server, not per worker process, as Postfix's anvil(8)
keeps them for all its smtpd processes.  The supervisor creates this table in shared
memory before it forks; every worker admits and releases connections in it.  A client
is its IPv4 address, or its IPv6 /64 (one site's allocation, where an address of its
own costs a client nothing).

Layout: a memfd holds a header (live sessions per worker slot) and a fixed number of
client slots: (key 16 bytes, rate window start, rate count, sessions per worker slot).
A client hashes to a run of PROBE slots; a slot whose sessions are all gone and whose
rate window has passed is free again, so the table never needs a sweep.  When every
slot of a run is busy (more distinct clients at once than the table was sized for)
the connection is admitted uncounted rather than refused: the limits bound abuse,
they must not turn away mail because a table is full.

Counts are per worker slot so that the supervisor can forget a crashed worker's
sessions at once (``clear``): a worker killed -9 never decremented its counts.

Concurrency: client slots are changed under an flock on the memfd (a few
microseconds per connection); each worker's session total is written only by that
worker, so clients exempt from the per-client limits take no lock at all.

Security: created before the jail; the workers only hold the descriptor and mapping.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

OK = 0
BUSY = 1  # maxsessions reached
TOO_MANY = 2  # maxperclient reached
RATE = 3  # clientrate reached

PROBE = 32
RATE_WINDOW = 60.0  # seconds: clientrate counts connections per minute
_KEY = struct.Struct("16s")
_RATE = struct.Struct("dI")  # window start (monotonic seconds), connections in it
_U32 = struct.Struct("I")


def client_key(addr: str) -> bytes:
    """16 bytes naming the client: its IPv4 address, or the /64 of its IPv6 address."""
    import socket  # noqa: PLC0415

    try:
        packed = socket.inet_pton(socket.AF_INET, addr)
        return b"\0" * 10 + b"\xff\xff" + packed
    except OSError:
        pass
    try:
        return socket.inet_pton(socket.AF_INET6, addr)[:8] + b"\0" * 8
    except OSError:
        return _KEY.pack(addr.encode("utf-8", "replace")[:16])


class Anvil:
    """The shared table (see the module docstring)."""

    def __init__(self, workers: int, clients: int = 4096) -> None:
        self.workers = workers
        self.clients = clients
        self._counts = struct.Struct(f"{workers}H")
        self._slot = _KEY.size + _RATE.size + self._counts.size
        self._header = struct.Struct(f"{workers}I")
        size = self._header.size + clients * self._slot
        self.fd = os.memfd_create("smapq-anvil", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def _offset(self, index: int) -> int:
        return self._header.size + index * self._slot

    def _run(self, key: bytes) -> range | list[int]:
        """The slots ``key`` may live in, in probe order."""
        start = int.from_bytes(key, "big") * 0x9E3779B97F4A7C15 % self.clients
        if start + PROBE <= self.clients:
            return range(start, start + PROBE)
        return [(start + i) % self.clients for i in range(PROBE)]

    def _counts_at(self, key: bytes) -> int | None:
        """Offset of the session counts of ``key``'s slot, None when it has none."""
        for index in self._run(key):
            off = self._offset(index)
            if self.mem[off : off + 16] == key:
                return off + 16 + _RATE.size
        return None

    def _find(self, key: bytes, now: float) -> int | None:
        """The slot of ``key`` (made from a free one if needed), None if all busy."""
        free = None
        mem = self.mem
        for index in self._run(key):
            off = self._offset(index)
            if mem[off : off + 16] == key:
                return index
            if free is None and self._idle(off, now):
                free = index
        if free is not None:
            off = self._offset(free)
            mem[off : off + self._slot] = bytes(self._slot)
            mem[off : off + 16] = key
        return free

    def _idle(self, off: int, now: float) -> bool:
        mem = self.mem
        if mem[off : off + 16] == bytes(16):
            return True
        start, _ = _RATE.unpack_from(mem, off + 16)
        counts = self._counts.unpack_from(mem, off + 16 + _RATE.size)
        return not any(counts) and now - start >= RATE_WINDOW

    def admit(
        self, worker: int, key: bytes | None, now: float, total: int, per_client: int, rate: int
    ) -> int:
        """Count a new connection at ``worker``, or say which limit refuses it (0 for a
        limit means none).  ``key`` None: a client the per-client limits do not apply
        to (loopback), counted in the total only.

        Each worker writes only its own total, so the total needs no lock: a race
        between workers may admit a connection or two past ``maxsessions``, never
        lose count.  Client slots are shared, so they are changed under the lock."""
        if key is not None:
            with self._locked():
                verdict = self._client(worker, key, now, per_client, rate)
            if verdict != OK:
                return verdict
        if total and sum(self._header.unpack_from(self.mem, 0)) >= total:
            if key is not None:
                self._release_client(worker, key)
            return BUSY
        self._add_live(worker, 1)
        return OK

    def _client(self, worker: int, key: bytes, now: float, per_client: int, rate: int) -> int:
        mem = self.mem
        index = self._find(key, now)
        if index is None:
            return OK  # the table is full here: admitted uncounted (see the docstring)
        off = self._offset(index) + 16
        start, seen = _RATE.unpack_from(mem, off)
        if now - start >= RATE_WINDOW:
            start, seen = now, 0
        seen += 1  # refused attempts count too: a hammering client stays out
        _RATE.pack_into(mem, off, start, seen)
        if rate and seen > rate:
            return RATE
        coff = off + _RATE.size
        counts = list(self._counts.unpack_from(mem, coff))
        if per_client and sum(counts) >= per_client:
            return TOO_MANY
        counts[worker] = min(counts[worker] + 1, 0xFFFF)
        self._counts.pack_into(mem, coff, *counts)
        return OK

    def _add_live(self, worker: int, delta: int) -> None:
        (live,) = _U32.unpack_from(self.mem, worker * 4)
        _U32.pack_into(self.mem, worker * 4, max(0, live + delta))

    def release(self, worker: int, key: bytes | None) -> None:
        """A connection admitted at ``worker`` has ended."""
        self._add_live(worker, -1)
        if key is not None:
            self._release_client(worker, key)

    def _release_client(self, worker: int, key: bytes) -> None:
        with self._locked():
            coff = self._counts_at(key)
            if coff is not None:
                counts = list(self._counts.unpack_from(self.mem, coff))
                counts[worker] = max(0, counts[worker] - 1)
                self._counts.pack_into(self.mem, coff, *counts)

    def clear(self, worker: int) -> None:
        """Forget every session of ``worker`` (it exited, perhaps killed)."""
        with self._locked():
            mem = self.mem
            _U32.pack_into(mem, worker * 4, 0)
            for index in range(self.clients):
                coff = self._offset(index) + 16 + _RATE.size
                counts = list(self._counts.unpack_from(mem, coff))
                if counts[worker]:
                    counts[worker] = 0
                    self._counts.pack_into(mem, coff, *counts)

    def sessions(self, key: bytes | None = None) -> int:
        """Live sessions in all, or of one client (for tests and status)."""
        with self._locked():
            if key is None:
                return sum(self._header.unpack_from(self.mem, 0))
            coff = self._counts_at(key)
            return 0 if coff is None else sum(self._counts.unpack_from(self.mem, coff))
