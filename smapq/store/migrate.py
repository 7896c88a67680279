"""Schema migrations through alembic, found in the installed ``smapq_migrations``.

Purpose: ``smapq init`` and ``smapq db upgrade|current|check`` run alembic against the
queue database without an ``alembic.ini`` or the source tree: the script location is
the directory of the installed ``smapq_migrations`` package.
"""

from __future__ import annotations

import io
import os
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import smapq_migrations
from smapq.errors import SmapqError


def alembic_config(engine: Engine, stdout: TextIO | None = None) -> Config:
    cfg = Config(stdout=stdout or io.StringIO())
    cfg.set_main_option("script_location", os.path.dirname(smapq_migrations.__file__))
    url = engine.url.render_as_string(hide_password=False)
    # ConfigParser interpolation: a literal % in a URL must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str:
    script = ScriptDirectory.from_config(alembic_config(engine))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def require_current(engine: Engine) -> None:
    """Refuse to work on a database whose schema is not at head."""
    current, head = current_revision(engine), head_revision(engine)
    if current != head:
        raise SmapqError(
            f"database schema is at {current or 'nothing'}, this smapq needs {head}: "
            "run 'smapq db upgrade'"
        )
