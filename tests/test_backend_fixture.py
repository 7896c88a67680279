"""The backend fixture reaches every helper that makes a spool, whatever its import name."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Backend, make_spool
from tests.deliver.kit import make_queue


def test_make_spool_uses_the_running_backend(backend: Backend, tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    assert spool.backend == backend.name
    assert spool.scalar("SELECT count(*) FROM messages") == 0


def test_the_deliver_kit_uses_the_running_backend(backend: Backend, tmp_path: Path) -> None:
    q = make_queue(tmp_path, "/bin/true")
    assert q.spool.backend == backend.name
