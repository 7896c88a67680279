"""A scripted SMTP server on a real socket, for testing the benches' load generators.

Connection k is answered as ``script(k)`` says (a subclass's ``_serve`` acts it out),
each on its own thread, so a generator's miscount shows as a wrong number.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Callable


class ScriptedServer:
    """Accepts on 127.0.0.1 (any port) and hands connection k to ``_serve``."""

    def __init__(self, script: Callable[[int], str]) -> None:
        self.script = script
        self.did: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                k = self.count
                self.count += 1
            threading.Thread(target=self._serve, args=(conn, k), daemon=True).start()

    def _serve(self, conn: socket.socket, k: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()
