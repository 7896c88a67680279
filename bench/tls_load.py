"""The STARTTLS load generator of bench/intake.py: bench/tls_source.c, built at run time.

Purpose: smtp-source has no TLS, and a Python client costs the machine 3-5 ms of CPU
per message, more than the servers it measures on the same 2 cores.  ``Generator``
compiles bench/tls_source.c (threads and OpenSSL, about 0.2 ms of client CPU per TLS
message) into a working directory with ``gcc -O2 ... -lssl -lcrypto`` and runs it;
without gcc or libssl's headers it falls back to bench/tls_source.py and says so in
``Generator.name``, which the bench prints with its numbers.

Diagnostics: a failed build is reported in ``Generator.name`` (why the fallback);
a run with any unexpected reply, failed handshake or timeout raises ``RigError`` with
the generator's first complaint and its error count.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchrig import RigError

HERE = Path(__file__).resolve().parent
SOURCE_C = HERE / "tls_source.c"
SOURCE_PY = HERE / "tls_source.py"
TIMEOUT = 600


@dataclass
class LoadRun:
    """What one run of the generator reports."""

    wall: float  # seconds from the start line to the last session's end
    cpu: float  # the generator's own CPU seconds
    resumed: int  # TLS sessions resumed (with --resume)
    tickets: int = -1  # session tickets the server sent (-1: the generator cannot tell)
    version: str = ""  # TLS version and cipher of a connection
    cipher: str = ""
    waits: str = ""  # "connect:0.04,banner:0.3,...": ms per message waiting for each reply


def _openssl_version() -> str:
    done = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=False)
    return " ".join(done.stdout.split()[:2]) or "OpenSSL ?"


class Generator:
    """bench/tls_source.c compiled under ``workdir``, or the Python fallback."""

    def __init__(self, workdir: Path, python_only: bool = False) -> None:
        self.binary: Path | None = None
        gcc = shutil.which("gcc")
        if python_only:
            why = "asked for"
        elif gcc is None:
            why = "gcc is missing"
        else:
            workdir.mkdir(parents=True, exist_ok=True)
            out = workdir / "tls_source"
            argv = [gcc, "-O2", "-pthread", "-o", str(out), str(SOURCE_C), "-lssl", "-lcrypto"]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                self.binary = out
                why = ""
            else:
                why = "gcc failed: " + ((done.stderr.strip().splitlines() or ["?"])[-1])[:120]
        if self.binary is not None:
            self.name = f"bench/tls_source.c (C, one thread per session, {_openssl_version()})"
        else:
            self.name = f"bench/tls_source.py (Python fallback: {why}; costs 3-5 ms CPU/msg)"

    def run(
        self,
        port: int,
        sessions: int,
        messages: int,
        size: int,
        tls: bool = True,
        resume: bool = False,
    ) -> LoadRun:
        """Send ``messages`` over ``sessions`` parallel sessions, one per connection."""
        flags = [*([] if tls else ["--plain"]), *(["--resume"] if resume else [])]
        common = ["-s", str(sessions), "-m", str(messages), "-l", str(size), *flags]
        if self.binary is not None:
            argv = [str(self.binary), *common, f"127.0.0.1:{port}"]
        else:
            argv = [sys.executable, str(SOURCE_PY), *common, f"127.0.0.1:{port}"]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise RigError(f"tls_source did not finish in {TIMEOUT} s: {' '.join(argv)}") from None
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no message"]
            first = lines[0] if len(lines) > 1 else ""
            raise RigError(f"tls_source exited {done.returncode}: {lines[-1]} (first: {first})")
        if self.binary is None:
            _, wall, cpu, resumed = done.stdout.split()
            return LoadRun(float(wall), float(cpu), int(resumed))
        out = dict(word.split("=", 1) for word in done.stdout.split() if "=" in word)
        if int(out["ok"]) != messages or int(out["errors"]):
            raise RigError(f"tls_source: {out['ok']} of {messages} sent, {out['errors']} errors")
        return LoadRun(
            float(out["wall"]),
            float(out["cpu"]),
            int(out["resumed"]),
            int(out["tickets"]),
            out["tls"],
            out["cipher"],
            out.get("wait_ms", ""),
        )
