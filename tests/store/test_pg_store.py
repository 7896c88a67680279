"""The store on the real PostgreSQL: claims that skip each other, leases and fencing,
read-only by the server, init and the db verbs, an unreachable server in one line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from smapq.store import faults, migrate, queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id
from tests.conftest import make_spool, program, write_table


@pytest.fixture
def engine(pg_url: str) -> Iterator[Engine]:
    e = make_engine(pg_url)
    migrate.upgrade(e)
    yield e
    e.dispose()


def _add(engine: Engine, due: float = 1.0, rcpts: tuple[str, ...] = ("r@x",)) -> str:
    qid = new_queue_id()
    body = b"hi\n"
    msg = {
        "queue_id": qid,
        "protocol": "SMTP",
        "mail_from": "s@x",
        "size": 3,
        "trace": "",
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "received_at": 1.0,
        "next_attempt_at": due,
    }
    with engine.begin() as conn:
        queries.insert_message(conn, msg, list(rcpts))
    return qid


def test_concurrent_claims_skip_each_others_rows(engine: Engine) -> None:
    """A claim whose transaction is still open holds its rows: a second deliverer's
    claim does not wait for it and takes the others (FOR UPDATE SKIP LOCKED)."""
    ids = {_add(engine, due=float(n + 1)) for n in range(6)}
    with engine.connect() as first, first.begin():
        mine = {r.queue_id for r in queries.claim(first, "a", 100.0, 60, 3)}
        got: list[set[str]] = []

        def other() -> None:
            with engine.begin() as conn:
                got.append({r.queue_id for r in queries.claim(conn, "b", 100.0, 60, 10)})

        t = threading.Thread(target=other)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the second claim waited for the first one's locks"
    assert len(mine) == 3
    assert got == [ids - mine]


def test_leases_and_fencing_as_on_sqlite(engine: Engine) -> None:
    qid = _add(engine)
    with engine.begin() as conn:
        [first] = queries.claim(conn, "old", 100.0, 60, 10)
    assert first.lease_token == 1
    with engine.begin() as conn:
        assert queries.renew_leases(conn, "old", [first.id], 170.0) == {first.id}
        assert queries.recover_expired(conn, 165.0) == []  # renewed: not expired yet
    with engine.begin() as conn:
        assert [r.queue_id for r in queries.recover_expired(conn, 200.0)] == [qid]
        [second] = queries.claim(conn, "new", 200.0, 60, 10)
    assert second.lease_token == first.lease_token + 1
    with engine.begin() as conn:
        assert not queries.renew_leases(conn, "old", [first.id], 500.0)
        [rid] = [r.id for r in queries.unsent_recipients(conn, [first.id])]
        assert not queries.mark_sent(conn, first.id, first.lease_token, [rid], 201.0, "x")
        outcome = {
            "message_id": first.id,
            "token": first.lease_token,
            "queue_id": qid,
            "event": "delivered",
            "code": 0,
            "detail": "stale",
            "state": "delivered",
            "attempts": 1,
            "next_attempt_at": 0.0,
            "delivered_at": 201.0,
        }
        assert queries.record_outcomes(conn, 201.0, [outcome]) == set()
        fresh = {**outcome, "token": second.lease_token, "detail": "ok"}
        assert queries.record_outcomes(conn, 202.0, [fresh]) == {(first.id, second.lease_token)}
    with engine.begin() as conn:
        row = queries.message_by_queue_id(conn, qid)
        assert row is not None
        assert (row.state, row.last_result, row.lease_owner) == ("delivered", "ok", None)
        kinds = [e.kind for e in queries.events_of(conn, qid)]
    assert kinds == ["claim", "recovered", "claim", "delivered"]


def test_two_recoveries_of_one_expired_lease_count_it_once(engine: Engine) -> None:
    qid = _add(engine)
    with engine.begin() as conn:
        queries.claim(conn, "dead", 100.0, 60, 10)
    with engine.connect() as a, engine.connect() as b:
        a.begin()
        assert len(queries.recover_expired(a, 500.0)) == 1
        b.begin()
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(len(queries.recover_expired(b, 500.0))))
        t.start()  # waits for a's row lock, then finds the row no longer delivering
        a.commit()
        t.join(60)
        b.commit()
    assert result == [0]
    with engine.begin() as conn:
        row = queries.message_by_queue_id(conn, qid)
        assert row is not None and (row.state, row.attempts) == ("received", 1)


def test_read_only_engine_is_read_only_by_the_server(engine: Engine, pg_url: str) -> None:
    _add(engine)
    ro = make_engine(pg_url, readonly=True)
    try:
        with ro.connect() as conn:
            assert conn.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "on"
            with pytest.raises(DBAPIError) as caught:
                conn.exec_driver_sql("DELETE FROM messages")
            assert faults.kind(caught.value) == faults.READONLY
    finally:
        ro.dispose()
    with engine.begin() as conn:
        assert queries.count_by_state(conn) == {"received": 1}


def test_no_migration_is_missing_on_postgresql(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from smapq.store.schema import metadata

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert list(compare_metadata(ctx, metadata)) == []
        types = dict(
            conn.exec_driver_sql(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'messages'"
            ).all()
        )
    assert types["received_at"] == "double precision"
    assert types["body"] == "bytea"
    assert types["id"] == "bigint"


def test_init_and_the_db_verbs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    spool = make_spool(tmp_path, extra=f"smap, smapd: database {pg_url}\n", cli_init=True)
    assert spool.smapq("db", "current").stdout.strip() == "0002"
    assert "is current" in spool.smapq("db", "check").stdout
    again = spool.smapq("init")
    assert "nothing to change" in again.stdout
    assert spool.smapq("db", "upgrade").stdout.strip() == "schema 0002"
    assert spool.smapq("db", "downgrade", "base").stdout.strip() == "schema empty"
    assert spool.smapq("db", "current").stdout.strip() == "empty"
    failed = spool.smapq("db", "check", check=False)
    assert failed.returncode != 0 and "db upgrade" in failed.stderr
    assert "schema empty -> 0002" in spool.smapq("db", "upgrade").stdout
    assert "summary" in spool.smapq("report", "summary", "--format", "json").stdout


def test_init_names_the_server_not_a_file(tmp_path: Path, pg_url: str) -> None:
    table = write_table(
        tmp_path / "t",
        f"smap, smapd: directory {tmp_path / 'q'}\nsmap: jail off\n"
        f"smap, smapd: database {pg_url}\n",
    )
    proc = subprocess.run(
        [program("smapq"), "-t", str(table), "init"], capture_output=True, text=True, check=True
    )
    assert f"{pg_url}: created schema 0002" in proc.stdout
    assert not list((tmp_path / "q").iterdir())  # no database file was made


@pytest.mark.parametrize(
    "args",
    [("init",), ("db", "current"), ("db", "check"), ("report", "summary"), ("queue",)],
)
def test_an_unreachable_server_is_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    table = write_table(
        tmp_path / "t",
        f"smap, smapd: directory {tmp_path / 'q'}\nsmap: jail off\nsmap, smapd: database {url}\n",
    )
    proc = subprocess.run(
        [program("smapq"), "-t", str(table), *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "warning:" not in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("smapq: ") and "127.0.0.1" in lines[0]


def test_a_libpq_service_file_names_the_server(tmp_path: Path, pg_url: str) -> None:
    """No host, user or password in the table: libpq reads them from pg_service.conf
    (the same way it reads ~/.pgpass for a password)."""
    from sqlalchemy.engine import make_url

    u = make_url(pg_url)
    service = tmp_path / "pg_service.conf"
    service.write_text(
        f"[smapqtest]\nhost={u.host}\nport={u.port or 5432}\nuser={u.username}\n"
        f"dbname={u.database}\n"
    )
    table = write_table(
        tmp_path / "t",
        f"smap, smapd: directory {tmp_path / 'q'}\nsmap: jail off\n"
        "smap, smapd: database postgresql+psycopg:///?service=smapqtest\n",
    )
    env = {**os.environ, "PGSERVICEFILE": str(service)}
    run = [program("smapq"), "-t", str(table)]
    subprocess.run([*run, "init"], capture_output=True, text=True, check=True, env=env)
    proc = subprocess.run(
        [*run, "db", "current"], capture_output=True, text=True, check=True, env=env
    )
    assert proc.stdout.strip() == "0002"


def test_writers_commit_durably_when_the_server_default_is_off(pg_url: str) -> None:
    """A database whose default is synchronous_commit = off: smapq's writers raise it
    to on for their sessions (a crash then repeats only what was in flight); readers
    and an administrator's stronger choice are left alone."""
    from sqlalchemy.engine import make_url

    name = make_url(pg_url).database
    admin = make_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    admin.dispose()
    writer, reader = make_engine(pg_url), make_engine(pg_url, readonly=True)
    try:
        with writer.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        with reader.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
    finally:
        writer.dispose()
        reader.dispose()
    stronger = make_engine(pg_url)
    with stronger.begin() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = remote_apply')
    stronger.dispose()
    again = make_engine(pg_url)
    try:
        with again.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "remote_apply"
    finally:
        again.dispose()
