"""``smapq db grant`` on the real PostgreSQL: each role can do its job and nothing more.

Every check connects as a LOGIN role that is a member of the group role under test
(trust auth: the server asks no password), with psycopg or the installed smapq, and
asserts what PostgreSQL allows and refuses.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from smapq.store import migrate, queries
from smapq.store.engine import make_engine
from smapq.store.ids import new_queue_id
from tests.conftest import make_spool, program, write_table

_serial = itertools.count()
PRIVILEGES = """
SELECT grantee, table_name, string_agg(privilege_type, ',' ORDER BY privilege_type)
FROM information_schema.role_table_grants WHERE grantee = ANY(%s)
GROUP BY grantee, table_name ORDER BY 1, 2
"""


def libpq(url: str, user: str | None = None) -> str:
    """The SQLAlchemy ``url`` as a libpq URL, optionally as another user."""
    rest = url.split("://", 1)[1]
    if user is not None:
        rest = user + "@" + rest.split("@", 1)[1]
    return "postgresql://" + rest


class Roles:
    """Role names unique to one test, and the login roles it made; all dropped after."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"smapq_t{os.getpid()}_{next(_serial)}"
        self.logins: list[str] = []

    def group(self, audience: str) -> str:
        return f"{self.prefix}_{audience}"

    def login(self, audience: str) -> str:
        name = f"{self.prefix}_{audience}_login"
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE {self.group(audience)}")
        self.logins.append(name)
        return name

    def drop(self) -> None:
        names = self.logins + [self.group(a) for a in ("receiver", "deliverer", "report")]
        with psycopg.connect(libpq(self.url), autocommit=True) as conn:
            there = [
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (names,)
                )
            ]
            if there:
                conn.execute(f"DROP OWNED BY {', '.join(there)}")
                conn.execute(f"DROP ROLE {', '.join(there)}")


@pytest.fixture
def queue_url(pg_url: str) -> str:
    engine = make_engine(pg_url)
    migrate.upgrade(engine)
    engine.dispose()
    return pg_url


@pytest.fixture
def roles(queue_url: str) -> Iterator[Roles]:
    r = Roles(queue_url)
    yield r
    r.drop()


def grant(roles: Roles, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("smapq"), "db", "grant", "--url", roles.url, "--prefix", roles.prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def privileges(roles: Roles) -> dict[tuple[str, str], str]:
    groups = [roles.group(a) for a in ("receiver", "deliverer", "report")]
    with psycopg.connect(libpq(roles.url)) as conn:
        rows = conn.execute(PRIVILEGES, (groups,)).fetchall()
    return {(g.rsplit("_", 1)[1], t): p for g, t, p in rows}


EXPECTED = {
    ("receiver", "alembic_version"): "SELECT",
    ("receiver", "events"): "INSERT",
    ("receiver", "messages"): "INSERT",
    ("receiver", "recipients"): "INSERT",
    ("deliverer", "alembic_version"): "SELECT",
    ("deliverer", "events"): "DELETE,INSERT,SELECT,UPDATE",
    ("deliverer", "messages"): "DELETE,INSERT,SELECT,UPDATE",
    ("deliverer", "recipients"): "DELETE,INSERT,SELECT,UPDATE",
    ("report", "alembic_version"): "SELECT",
    ("report", "events"): "SELECT",
    ("report", "messages"): "SELECT",
    ("report", "recipients"): "SELECT",
}


def queue_message(
    url: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n", rcpt: str = "rcpt@example.net"
) -> str:
    engine = make_engine(url)
    queue_id = new_queue_id()
    message = {
        "queue_id": queue_id,
        "protocol": "ESMTP",
        "mail_from": "sender@example.org",
        "size": len(body),
        "trace": "",
        "body": body,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "received_at": 1.0,
        "next_attempt_at": 1.0,
    }
    with engine.begin() as conn:
        queries.insert_message(conn, message, [rcpt])
    engine.dispose()
    return queue_id


def test_grant_creates_nologin_roles_with_exact_privileges_and_is_idempotent(
    roles: Roles,
) -> None:
    first = grant(roles)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("created (NOLOGIN)") == 3
    assert privileges(roles) == EXPECTED
    with psycopg.connect(libpq(roles.url)) as conn:
        logins = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE %s",
            (roles.prefix + "%",),
        ).fetchall()
    assert sorted(logins) == sorted((roles.group(a), False) for a in EXPECTED_AUDIENCES)
    second = grant(roles)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count(": exists;") == 3
    assert privileges(roles) == EXPECTED


EXPECTED_AUDIENCES = ("receiver", "deliverer", "report")


def test_grant_takes_back_privileges_a_role_should_not_have(roles: Roles) -> None:
    assert grant(roles).returncode == 0
    with psycopg.connect(libpq(roles.url), autocommit=True) as conn:
        conn.execute(f"GRANT SELECT (body) ON messages TO {roles.group('receiver')}")
        conn.execute(f"GRANT SELECT, UPDATE ON messages, events TO {roles.group('receiver')}")
        conn.execute(f"GRANT INSERT ON events TO {roles.group('report')}")
    assert grant(roles).returncode == 0
    assert privileges(roles) == EXPECTED
    rcv = roles.login("receiver")
    with (
        psycopg.connect(libpq(roles.url, rcv)) as conn,
        pytest.raises(errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT body FROM messages")


def _intake_as(url: str, queue_id: str) -> None:
    """What the intake runs on PostgreSQL: ids drawn by nextval(), inserted explicitly,
    no RETURNING, one transaction with synchronous_commit on and the NOTIFY."""
    with psycopg.connect(url) as conn:
        conn.execute("SET LOCAL synchronous_commit = on")
        (mid,) = conn.execute("SELECT nextval('messages_id_seq')").fetchone() or (0,)
        conn.execute(
            "INSERT INTO messages (id, queue_id, state, received_at, protocol, mail_from, size,"
            " trace, body, body_sha256, next_attempt_at, updated_at) VALUES"
            " (%s, %s, 'received', 1, 'ESMTP', 'a@example.org', 2, '', 'hi', 'x', 1, 1)",
            (mid, queue_id),
        )
        conn.execute(
            "INSERT INTO recipients (id, message_id, position, address) VALUES"
            " (nextval('recipients_id_seq'), %s, 0, 'b@example.net'),"
            " (nextval('recipients_id_seq'), %s, 1, 'c@example.net')",
            (mid, mid),
        )
        conn.execute(
            "INSERT INTO events (id, at, kind, queue_id) VALUES"
            " (nextval('events_id_seq'), 1, 'accept', %s)",
            (queue_id,),
        )
        conn.execute("INSERT INTO events (at, kind, session_id) VALUES (1, 'disconnect', 's1')")
        conn.execute("NOTIFY smapq_queue")


def test_receiver_inserts_mail_and_reads_nothing_back(roles: Roles) -> None:
    assert grant(roles).returncode == 0
    other = queue_message(roles.url, b"secret body")
    rcv = libpq(roles.url, roles.login("receiver"))
    _intake_as(rcv, "Q-RECEIVER-1")
    with psycopg.connect(libpq(roles.url)) as conn:
        got = conn.execute(
            "SELECT m.queue_id, count(r.id) FROM messages m JOIN recipients r"
            " ON r.message_id = m.id WHERE m.queue_id = 'Q-RECEIVER-1' GROUP BY 1"
        ).fetchall()
        kinds = conn.execute(
            "SELECT kind FROM events WHERE queue_id = 'Q-RECEIVER-1' OR session_id = 's1'"
            " ORDER BY id"
        ).fetchall()
    assert got == [("Q-RECEIVER-1", 2)]
    assert kinds == [("accept",), ("disconnect",)]
    refused = [
        "SELECT body FROM messages",
        f"SELECT count(*) FROM messages WHERE queue_id = '{other}'",
        "SELECT address FROM recipients",
        "SELECT detail FROM events",
        "UPDATE messages SET state = 'bad'",
        "DELETE FROM events",
        "SELECT last_value FROM messages_id_seq",
        "SELECT setval('messages_id_seq', 1)",
        "INSERT INTO events (at, kind) VALUES (1, 'x') RETURNING id",
        "INSERT INTO messages (queue_id, state, received_at, protocol, mail_from, size, trace,"
        " body_sha256, next_attempt_at, updated_at) VALUES ('Q2', 'received', 1, 'SMTP', 'a',"
        " 0, '', 'x', 1, 1) RETURNING body",
    ]
    for stmt in refused:
        with psycopg.connect(rcv) as conn, pytest.raises(errors.InsufficientPrivilege):
            conn.execute(stmt)


def test_deliverer_role_runs_smapd(roles: Roles, tmp_path: Path, open_dir: Path) -> None:
    assert grant(roles).returncode == 0
    queue_id = queue_message(roles.url)
    dlv = roles.login("deliverer")
    sendmail = open_dir / "sendmail"
    sendmail.write_text("#!/bin/sh\ncat > /dev/null\n")
    sendmail.chmod(0o755)
    url = roles.url.replace("postgres@", dlv + "@", 1)
    spool = make_spool(
        tmp_path, extra=f"smapd: sendmail {sendmail}\nsmap, smapd: database {url}\n"
    )
    done = spool.smapq("deliver", "--once", check=False)
    assert done.returncode == 0, done.stderr
    assert "delivered=1" in done.stderr
    with psycopg.connect(libpq(roles.url)) as conn:
        state = conn.execute(
            "SELECT state FROM messages WHERE queue_id = %s", (queue_id,)
        ).fetchone()
    assert state == ("delivered",)
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("LISTEN smapq_queue")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("DROP TABLE events")


def test_deliverer_role_bounces_and_runs_retention(
    roles: Roles, tmp_path: Path, open_dir: Path
) -> None:
    """The rest of smapd's statements as the deliverer: a failure's notice to the sender
    (an INSERT of a new message), retention's UPDATE of old bodies and DELETE of old
    events."""
    assert grant(roles).returncode == 0
    failing = queue_message(roles.url, rcpt="nobody@example.net")
    with psycopg.connect(libpq(roles.url)) as conn:
        conn.execute(
            "UPDATE messages SET state = 'delivered', delivered_at = 1 WHERE queue_id = %s",
            (queue_message(roles.url),),
        )
        conn.execute("INSERT INTO events (at, kind, session_id) VALUES (1, 'connect', 'old')")
    dlv = roles.login("deliverer")
    sendmail = open_dir / "sendmail"
    sendmail.write_text('#!/bin/sh\ncat > /dev/null\ncase "$*" in *nobody@*) exit 67;; esac\n')
    sendmail.chmod(0o755)
    url = roles.url.replace("postgres@", dlv + "@", 1)
    spool = make_spool(
        tmp_path,
        extra=f"smapd: sendmail {sendmail}\nsmapd: bounce on\nsmap, smapd: database {url}\n",
    )
    done = spool.smapq("deliver", "--once", check=False)
    assert done.returncode == 1, done.stderr  # 1: something went bad
    assert "bad=1" in done.stderr and "queue database" not in done.stderr, done.stderr
    with psycopg.connect(libpq(roles.url)) as conn:
        states = dict(conn.execute("SELECT queue_id, state FROM messages").fetchall())
        notices = conn.execute("SELECT count(*) FROM messages WHERE mail_from = ''").fetchone()
        bodies = conn.execute(
            "SELECT count(*) FROM messages WHERE delivered_at = 1 AND body IS NULL"
        ).fetchone()
        old = conn.execute("SELECT count(*) FROM events WHERE session_id = 'old'").fetchone()
    assert states[failing] == "bad"
    assert notices == (1,)
    assert bodies == (1,)
    assert old == (0,)


def test_report_role_reads_and_cannot_write_even_read_write(roles: Roles, tmp_path: Path) -> None:
    assert grant(roles).returncode == 0
    queue_message(roles.url)
    rep = roles.login("report")
    url = roles.url.replace("postgres@", rep + "@", 1)
    spool = make_spool(tmp_path, extra=f"smap, smapd: database {url}\n")
    summary = spool.smapq("report", "summary", check=False)
    assert summary.returncode == 0, summary.stderr
    assert "received             1" in summary.stdout
    sql = spool.smapq("report", "sql", "SELECT count(*) AS n FROM messages", check=False)
    assert sql.returncode == 0 and "1" in sql.stdout, sql.stderr
    write = spool.smapq("report", "sql", "DELETE FROM events", check=False)
    assert write.returncode != 0 and write.stderr.count("\n") == 1, write.stderr
    for stmt in (
        "DELETE FROM events",
        "UPDATE messages SET state = 'bad'",
        "INSERT INTO events (at, kind) VALUES (1, 'x')",
        "SELECT nextval('events_id_seq')",
    ):
        with psycopg.connect(libpq(url)) as conn:
            conn.execute("SET TRANSACTION READ WRITE")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(stmt)


def test_grant_sql_is_what_a_dba_runs_with_psql(roles: Roles) -> None:
    out = grant(roles, "--sql")
    assert out.returncode == 0, out.stderr
    assert "CREATE ROLE" in out.stdout and out.stdout.rstrip().endswith("COMMIT;")
    assert privileges(roles) == {}  # printed, not run
    psql = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", libpq(roles.url), "-f", "-"],
        input=out.stdout,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert psql.returncode == 0, psql.stderr
    assert privileges(roles) == EXPECTED


def test_grant_errors_are_one_line(roles: Roles, tmp_path: Path) -> None:
    bad = grant(roles, "--prefix", "Bad-Name")
    assert bad.returncode == 64 and bad.stderr.count("\n") == 1, bad.stderr
    spool = make_spool(tmp_path)
    sqlite = spool.smapq("db", "grant", check=False)
    assert sqlite.returncode == 64 and sqlite.stderr.count("\n") == 1, sqlite.stderr
    nobody = roles.url.rsplit("/", 1)[0] + "/smapq_no_such_database"
    gone = subprocess.run(
        [program("smapq"), "db", "grant", "--url", nobody],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone.stderr
    assert "smapq_no_such_database" in gone.stderr


def test_service_file_names_the_server_and_role(
    roles: Roles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No password or host in the netperm-table: ``?service=`` and PGSERVICEFILE."""
    assert grant(roles).returncode == 0
    queue_message(roles.url)
    rep = roles.login("report")
    host, dbname = roles.url.split("@", 1)[1].split("/", 1)
    hostname, port = host.split(":")
    services = write_table(
        tmp_path / "pg_service.conf",
        f"[smapq-report]\nhost={hostname}\nport={port}\ndbname={dbname}\nuser={rep}\n"
        f"[smapq-role]\nuser={rep}\n",
    )
    monkeypatch.setenv("PGSERVICEFILE", str(services))  # smapq init connects too
    spool = make_spool(
        tmp_path, extra="smap, smapd: database postgresql+psycopg:///?service=smapq-report\n"
    )
    env = {**os.environ, "PGSERVICEFILE": str(services)}
    sql = spool.smapq("report", "sql", "SELECT current_user AS who", env=env, check=False)
    assert sql.returncode == 0, sql.stderr
    assert rep in sql.stdout
    # The form a jailed receiver needs: the host in the URL, the role from the service.
    table = spool.table.read_text().replace(
        "postgresql+psycopg:///?service=smapq-report",
        f"postgresql+psycopg://{host}/{dbname}?service=smapq-role",
    )
    spool.table.write_text(table)
    sql = spool.smapq("report", "sql", "SELECT current_user AS who", env=env, check=False)
    assert sql.returncode == 0, sql.stderr
    assert rep in sql.stdout
    env["PGSERVICEFILE"] = str(tmp_path / "missing.conf")
    missing = spool.smapq("report", "summary", env=env, check=False)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1, missing.stderr
