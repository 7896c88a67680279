"""A password in the database URL is legal but belongs in a passfile: a warning says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from smapq.config.settings import load, url_has_password
from tests.conftest import write_table


@pytest.mark.parametrize(
    ("url", "has"),
    [
        ("postgresql+psycopg://smapq:s3cret@db.example.org/smapq", True),
        ("postgresql+psycopg://smapq:@db/smapq", True),
        ("postgresql+psycopg://db/smapq?user=x&Password=y", True),
        ("postgresql+psycopg://smapq@db.example.org:5432/smapq", False),
        ("postgresql+psycopg:///?service=smapq", False),
        ("postgresql+psycopg://db/smapq?passfile=/etc/smapq/pgpass", False),
        ("/var/spool/smap/smapq.db", False),
        ("smapq.db", False),
    ],
)
def test_url_has_password(url: str, has: bool) -> None:
    assert url_has_password(url) is has


def test_a_password_in_the_table_is_warned_about_once_per_url(tmp_path: Path) -> None:
    secret = "postgresql+psycopg://mx1:s3cret@db/smapq"
    table = write_table(tmp_path / "t", f"smap, smapd: database {secret}\n")
    warned = [w for w in load(str(table)).warnings() if "password" in w]
    assert warned == [
        "smap, smapd: database URL carries a password: keep it in a passfile or service file "
        "instead (docs/postgresql.md)"
    ]
    clean = write_table(tmp_path / "u", "smap, smapd: database postgresql+psycopg:///?service=s\n")
    assert not [w for w in load(str(clean)).warnings() if "password" in w]
