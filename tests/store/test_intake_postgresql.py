"""The intake's PostgreSQL backend against the real server: all or nothing, group commit,
least privilege, durable commits whatever the server's default, NOTIFY in the commit,
faults as replies, reconnection."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from smapq.intake.port import StoreError, Submission
from smapq.smtp import replies as R
from smapq.store import intake_open
from smapq.store.intake_postgresql import CHANNEL, PostgresIntake, libpq_url
from tests.receive.superserver import free_port
from tests.receive.test_receive_queue import event, submission

pytestmark = pytest.mark.postgres

EVERY_BYTE = bytes(range(256)) * 4 + b"\r\n.\r\n\x00end\r\n"


def admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(libpq_url(url), autocommit=True)


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    with admin(url) as conn:
        return conn.execute(query).fetchall()  # type: ignore[arg-type]


def counts(url: str) -> tuple[object, ...]:
    (row,) = rows(
        url,
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM recipients),"
        " (SELECT count(*) FROM events)",
    )
    return row


@pytest.fixture
def store(pg_queue: str) -> Iterator[PostgresIntake]:
    q = PostgresIntake(pg_queue)
    yield q
    q.close()


def test_accept_writes_message_recipients_and_events_byte_exact(
    pg_queue: str, store: PostgresIntake
) -> None:
    connect, mail, acc = event("connect"), event("mail", "a@b.c"), event("accept", "a@b.c")
    sub = submission(EVERY_BYTE, events=[connect, mail, acc], tagged=[mail, acc])
    assert store.accept([sub]) == [None]
    qid = sub.queue_id
    (msg,) = rows(
        pg_queue,
        "SELECT queue_id, state, body, body_sha256, trace, client_addr, client_port,"
        " next_attempt_at, size, attempts, lease_token FROM messages",
    )
    assert msg[:3] == (qid, "received", EVERY_BYTE)
    assert msg[3] == hashlib.sha256(EVERY_BYTE).hexdigest()
    assert msg[4] == f"Received: by x id {qid}\r\n"
    assert msg[5:] == ("192.0.2.1", 2525, 1000.0, len(EVERY_BYTE), 0, 0)
    rcpts = rows(
        pg_queue,
        "SELECT r.position, r.address FROM recipients r JOIN messages m ON m.id = r.message_id"
        " ORDER BY r.position",
    )
    assert rcpts == [(0, "d@e.f"), (1, "g@h.i")]
    evs = rows(pg_queue, "SELECT kind, queue_id, address, code FROM events ORDER BY id")
    assert evs == [
        ("connect", None, None, 250),
        ("mail", qid, "a@b.c", 250),
        ("accept", qid, "a@b.c", 250),
    ]


def test_a_failing_row_leaves_nothing(pg_queue: str, store: PostgresIntake) -> None:
    bad = event("mail")
    bad["kind"] = None  # NOT NULL: fails after the message and recipients were inserted
    (err,) = store.accept([submission(events=[bad], tagged=[bad])])
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert counts(pg_queue) == (0, 0, 0)
    assert store.accept([submission()]) == [None]  # the connection goes on
    assert counts(pg_queue) == (1, 2, 0)


def test_a_batch_commits_together_and_a_bad_submission_fails_alone(
    pg_queue: str, store: PostgresIntake
) -> None:
    bad = event("mail")
    bad["kind"] = None
    good1, good2 = submission(b"one\r\n"), submission(b"two\r\n", rcpts=["x@y.z"])
    loose = Submission(None, (), [event("connect"), event("disconnect")])
    results = store.accept([good1, submission(events=[bad], tagged=[bad]), loose, good2])
    assert results[0] is None and results[2] is None and results[3] is None
    assert results[1] is not None and results[1].reply == R.R451_STORE_FAILED
    bodies = rows(pg_queue, "SELECT body FROM messages ORDER BY id")
    assert bodies == [(b"one\r\n",), (b"two\r\n",)]
    pairs = rows(
        pg_queue,
        "SELECT m.body, r.address FROM recipients r JOIN messages m ON m.id = r.message_id"
        " ORDER BY m.id, r.position",
    )
    assert pairs == [(b"one\r\n", "d@e.f"), (b"one\r\n", "g@h.i"), (b"two\r\n", "x@y.z")]
    assert counts(pg_queue)[2] == 2


def test_many_messages_in_one_batch(pg_queue: str, store: PostgresIntake) -> None:
    subs = [submission(f"m{i}\r\n".encode(), events=[event("accept")]) for i in range(1200)]
    assert store.accept(subs) == [None] * 1200  # more rows than one INSERT takes
    assert counts(pg_queue) == (1200, 2400, 1200)


def test_a_queue_id_collision_takes_a_new_id(pg_queue: str, store: PostgresIntake) -> None:
    first = submission()
    assert store.accept([first]) == [None]
    mail = event("mail")
    second = submission(events=[mail], tagged=[mail])
    assert second.message is not None
    second.message["queue_id"] = first.queue_id  # as if two receivers met in one microsecond
    second.message["trace"] = f"Received: by x id {first.queue_id}\r\n"
    assert store.accept([second]) == [None]
    assert second.queue_id != first.queue_id
    got = rows(pg_queue, "SELECT queue_id, trace FROM messages ORDER BY id")
    assert got[1] == (second.queue_id, f"Received: by x id {second.queue_id}\r\n")
    assert rows(pg_queue, "SELECT queue_id FROM events") == [(second.queue_id,)]


def test_an_insert_only_role_suffices_and_reads_nothing(pg_queue: str) -> None:
    """The receiver's least privilege: INSERT on three tables, USAGE on their
    sequences, no SELECT (so no INSERT ... RETURNING)."""
    role = f"smapq_rx_{os.getpid()}"
    ident = sql.Identifier(role)
    with admin(pg_queue) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("GRANT INSERT ON messages, recipients, events TO {}").format(ident))
        conn.execute(
            sql.SQL(
                "GRANT USAGE ON SEQUENCE messages_id_seq, recipients_id_seq, events_id_seq TO {}"
            ).format(ident)
        )
    url = pg_queue.replace("://postgres@", f"://{role}@")
    try:
        q = PostgresIntake(url)
        sub = submission(events=[event("accept")])
        assert q.accept([sub, Submission(None, (), [event("disconnect")])]) == [None, None]
        q.close()
        with psycopg.connect(libpq_url(url)) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT body FROM messages")
        assert counts(pg_queue) == (1, 2, 2)
    finally:
        with admin(pg_queue) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


PROBE = """
CREATE TABLE probe (tbl text, setting text);
CREATE FUNCTION probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO probe VALUES (TG_TABLE_NAME, current_setting('synchronous_commit'));
  RETURN NULL;
END $$;
CREATE TRIGGER probe AFTER INSERT ON messages FOR EACH STATEMENT EXECUTE FUNCTION probe();
CREATE TRIGGER probe AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION probe();
"""


def test_commits_are_durable_when_the_database_default_is_off(pg_queue: str) -> None:
    dbname = pg_queue.rsplit("/", 1)[1]
    with admin(pg_queue) as conn:
        conn.execute(PROBE)  # type: ignore[arg-type]
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(
                sql.Identifier(dbname)
            )
        )
    with admin(pg_queue) as conn:  # a new session has the database's default
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
    q = PostgresIntake(pg_queue)
    assert q.accept([submission(events=[event("accept")])]) == [None]
    assert q.accept([Submission(None, (), [event("disconnect")])]) == [None]
    q.close()
    # Mail commits with it on (durable, waits for a synchronous standby); the audit
    # events alone commit with it off, as the SQLite backend skips their fsync.
    assert rows(pg_queue, "SELECT tbl, setting FROM probe") == [
        ("messages", "on"),
        ("events", "on"),
        ("events", "off"),
    ]


def test_notify_is_sent_in_the_commit_and_only_for_mail(
    pg_queue: str, store: PostgresIntake
) -> None:
    with admin(pg_queue) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        assert store.accept([Submission(None, (), [event("connect")])]) == [None]
        bad = event("mail")
        bad["kind"] = None
        assert store.accept([submission(events=[bad], tagged=[bad])])[0] is not None
        assert list(listener.notifies(timeout=0.5)) == []  # no mail: nothing to pick up
        assert store.accept([submission(), submission()]) == [None, None]
        got = list(listener.notifies(timeout=30, stop_after=1))
        assert [n.channel for n in got] == [CHANNEL]
        assert list(listener.notifies(timeout=0.5)) == []  # one per commit, not per message


def _trigger(url: str, body: str, deferred: bool = False) -> None:
    when = "CONSTRAINT TRIGGER" if deferred else "TRIGGER"
    timing = " DEFERRABLE INITIALLY DEFERRED" if deferred else ""
    with admin(url) as conn:
        conn.execute(
            "CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "  # type: ignore[arg-type]
            + body
            + " RETURN NULL; END $$"
        )
        conn.execute(
            f"CREATE {when} fault AFTER INSERT ON messages{timing}"  # type: ignore[arg-type]
            " FOR EACH ROW EXECUTE FUNCTION fault()"
        )


def _untrigger(url: str) -> None:
    with admin(url) as conn:
        conn.execute("DROP TRIGGER fault ON messages")
        conn.execute("DROP FUNCTION fault()")


def test_disk_full_is_452_and_nothing_is_stored(pg_queue: str, store: PostgresIntake) -> None:
    _trigger(pg_queue, "RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full';")
    (err,) = store.accept([submission(events=[event("accept")])])
    assert err is not None and err.reply == R.R452_NO_SPACE
    assert "full" in err.reason
    assert counts(pg_queue) == (0, 0, 0)
    _untrigger(pg_queue)
    assert store.accept([submission()]) == [None]


def test_a_stuck_statement_is_cut_off_with_451(pg_queue: str) -> None:
    _trigger(pg_queue, "PERFORM pg_sleep(60);")
    q = PostgresIntake(pg_queue, timeout_ms=300)
    (err,) = q.accept([submission()])
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert "statement timeout" in err.reason
    q.close()
    assert counts(pg_queue) == (0, 0, 0)


def test_connection_killed_mid_transaction_is_451_then_reconnects(
    pg_queue: str, store: PostgresIntake
) -> None:
    _trigger(pg_queue, "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);")
    (err,) = store.accept([submission(events=[event("accept")])])
    assert err is not None and err.reply == R.R451_STORE_FAILED
    assert counts(pg_queue) == (0, 0, 0)
    _untrigger(pg_queue)
    assert store.accept([submission()]) == [None]  # a new connection, no pause: not a refusal
    assert counts(pg_queue) == (1, 2, 0)


def test_connection_lost_during_commit_is_451_never_250(
    pg_queue: str, store: PostgresIntake
) -> None:
    """A deferred trigger runs inside COMMIT: the server drops us there, so the client
    never learns the outcome from the server, and must hear 451."""
    _trigger(
        pg_queue,
        "PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5);",
        deferred=True,
    )
    sub = submission(events=[event("accept")])
    loose = Submission(None, (), [event("connect")])
    results = store.accept([sub, loose])
    assert all(r is not None and r.reply == R.R451_STORE_FAILED for r in results)
    assert counts(pg_queue) == (0, 0, 0)


def test_an_idle_connection_the_server_dropped_is_replaced_at_once(
    pg_queue: str, store: PostgresIntake
) -> None:
    assert store.accept([submission()]) == [None]
    dbname = pg_queue.rsplit("/", 1)[1]
    with admin(pg_queue) as conn:
        (n,) = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = 'smap'",
            [dbname],
        ).fetchone() or (0,)
    assert n == 1
    assert store.accept([submission()]) == [None]  # nothing was sent yet: retried
    assert counts(pg_queue) == (2, 4, 0)


def test_no_server_at_start_is_421() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/smapq"
    with pytest.raises(StoreError) as info:
        PostgresIntake(url)
    assert info.value.reply == R.R421_UNAVAILABLE
    assert "cannot connect" in info.value.reason


def test_no_schema_is_421_naming_init(pg_url: str) -> None:
    with pytest.raises(StoreError) as info:
        PostgresIntake(pg_url)
    assert info.value.reply == R.R421_UNAVAILABLE
    assert "smapq init" in info.value.reason


class _Smap:
    def __init__(self, database: str, jail: bool) -> None:
        self.database = database
        self.jail = jail
        self.database_is_url = "://" in database


def test_a_unix_socket_url_is_refused_with_the_jail_on(pg_queue: str) -> None:
    dbname = pg_queue.rsplit("/", 1)[1]
    url = f"postgresql+psycopg://postgres@/{dbname}?host=/var/run/postgresql"
    with pytest.raises(StoreError) as info:
        intake_open.before_jail(_Smap(url, jail=True))  # type: ignore[arg-type]
    assert "Unix-socket" in info.value.reason and info.value.reply == R.R421_UNAVAILABLE
    if os.path.exists("/var/run/postgresql/.s.PGSQL.5432"):
        store = intake_open.before_jail(_Smap(url, jail=False))  # type: ignore[arg-type]
        assert store is not None
        store.close()


def test_the_channel_is_the_deliverers() -> None:
    from smapq.store.dialects.postgresql import CHANNEL as LISTENED

    assert CHANNEL == LISTENED


def test_the_factory_picks_the_backend_by_url() -> None:
    assert intake_open.is_server("postgresql+psycopg://u@h/d")
    assert intake_open.is_server("postgresql://u@h/d")
    assert not intake_open.is_server("/var/spool/smap/smapq.db")
    assert not intake_open.is_server("mysql://u@h/d")
    assert intake_open.before_jail(_Smap("smapq.db", jail=True)) is None  # type: ignore[arg-type]
    with pytest.raises(StoreError) as info:
        intake_open.before_jail(_Smap("mysql://u@h/d", jail=True))  # type: ignore[arg-type]
    assert "mysql://" in info.value.reason


def test_a_service_file_is_read_once_then_not_needed(
    pg_queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?service=`` names host, port, database and user in pg_service.conf, read
    before the jail; reconnecting (in the jail, where the file is not) needs none."""
    dbname = pg_queue.rsplit("/", 1)[1]
    services = tmp_path / "pg_service.conf"
    services.write_text(f"[smapq]\nhost=127.0.0.1\nport=5432\ndbname={dbname}\nuser=postgres\n")
    monkeypatch.setenv("PGSERVICEFILE", str(services))
    store = intake_open.before_jail(_Smap("postgresql+psycopg://?service=smapq", jail=True))  # type: ignore[arg-type]
    assert store is not None
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "gone"))  # as in the jail
    store.close()  # the next batch connects again
    assert store.accept([submission()]) == [None]
    store.close()
    assert counts(pg_queue) == (1, 2, 0)
