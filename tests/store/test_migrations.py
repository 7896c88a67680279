"""Migrations on each backend: the migrated schema equals the models; down/up round-trips."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from smapq.store import migrate
from smapq.store.engine import make_engine
from smapq.store.schema import metadata


def _diff(database: str) -> list[object]:
    engine = make_engine(database)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


def test_upgrade_head_equals_models(database: str) -> None:
    engine = make_engine(database, create=True)
    migrate.upgrade(engine)
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    assert _diff(database) == []


def test_indexes_and_constraints_exist_after_upgrade(database: str) -> None:
    engine = make_engine(database, create=True)
    migrate.upgrade(engine)
    insp = inspect(engine)
    for table in metadata.tables.values():
        want = {ix.name for ix in table.indexes}
        have = {ix["name"] for ix in insp.get_indexes(table.name)}
        assert want <= have, table.name
    checks = {c["name"] for c in insp.get_check_constraints("messages")}
    assert {"ck_messages_state", "ck_messages_attempts"} <= checks


def test_downgrade_to_base_and_upgrade_again(database: str) -> None:
    engine = make_engine(database, create=True)
    migrate.upgrade(engine)
    migrate.downgrade(engine, "base")
    assert migrate.current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    migrate.upgrade(engine)
    assert _diff(database) == []


def test_every_revision_steps_down_and_up(database: str) -> None:
    engine = make_engine(database, create=True)
    script = migrate.ScriptDirectory.from_config(migrate.alembic_config(engine))
    revisions = [r.revision for r in script.walk_revisions()][::-1]
    for rev in revisions:
        migrate.upgrade(engine, rev)
        assert migrate.current_revision(engine) == rev
    for rev in reversed(revisions):
        down = script.get_revision(rev).down_revision
        migrate.downgrade(engine, str(down) if down else "base")
    assert migrate.current_revision(engine) is None
