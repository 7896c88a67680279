"""A migrated SQLite queue file to copy into new spools (the SQLite side of the
template database in tests/pgdb.py).

The installed ``smapq init`` makes the file once per pytest process, in a directory of
that process's own, removed at exit; the file is made again when the installed
migrations change (it is keyed by their digest), so a spool never gets an old schema.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_files: dict[str, str] = {}  # digest of the migrations -> the migrated file


def migrations_digest() -> str:
    """A digest of the installed migrations (what ``smapq init`` would run)."""
    import smapq_migrations

    digest = hashlib.sha256()
    top = Path(smapq_migrations.__file__).parent
    for path in sorted(top.rglob("*.py")):
        digest.update(str(path.relative_to(top)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def migrated_file() -> str:
    """The path of a queue database file at head, made by the installed ``smapq init``."""
    digest = migrations_digest()
    if digest not in _files:
        tmp = tempfile.mkdtemp(prefix=f"smapq-spooldb-{os.getpid()}-")
        atexit.register(shutil.rmtree, tmp, True)
        smapq_init(tmp, "smap: jail off\n")
        db = Path(tmp) / "spool" / "smapq.db"
        # Closed cleanly by init, so the file alone holds everything (no -wal to copy).
        assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
        _files[digest] = str(db)
    return _files[digest]


def smapq_init(directory: str, lines: str) -> None:
    """Run the installed ``smapq init`` on a throw-away table in ``directory``: its spool
    is ``directory``/spool, ``lines`` say the rest."""
    table = Path(directory) / "netperm-table"
    table.write_text(f"smap, smapd: directory {directory}/spool\n{lines}")
    table.chmod(0o600)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "smapq"), "-t", str(table), "init"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def place_migrated_file(directory: str, path: str) -> None:
    """Put a copy of the migrated file at ``path`` if no database is there yet and it
    would land in the spool ``directory`` (made here 0700 under umask 077, as ``smapq
    init`` makes it; init then sets the owner and mode the table asks for)."""
    if os.path.lexists(path) or os.path.dirname(path) != directory.rstrip("/"):
        return
    source = migrated_file()
    old = os.umask(0o077)
    try:
        os.makedirs(os.path.dirname(directory.rstrip("/")) or "/", mode=0o755, exist_ok=True)
        if not os.path.isdir(directory):
            os.mkdir(directory, 0o700)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            shutil.copyfileobj(src, out)
    finally:
        os.umask(old)
