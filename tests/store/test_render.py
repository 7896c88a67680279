"""``python -m smapq.store.render --check``: the installed rendered.py is current."""

from __future__ import annotations

import subprocess
import sys

from smapq.store import rendered
from smapq.store.render import render


def test_rendered_file_is_what_the_command_writes() -> None:
    with open(rendered.__file__, encoding="utf-8") as f:
        assert f.read() == render()


def test_check_mode_passes_on_the_installed_file() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "smapq.store.render", "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr


def test_postgresql_form_uses_psycopg_parameters() -> None:
    from smapq.store.queries import receiver_sql

    sql = receiver_sql("postgresql")
    assert set(sql) == set(receiver_sql("sqlite"))
    assert "%(queue_id)s" in sql["INSERT_MESSAGE"]
    assert ":queue_id" not in sql["INSERT_MESSAGE"]
