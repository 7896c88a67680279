"""Intake into PostgreSQL end to end: the real smap under openbsd-inetd and the real
``smapq serve`` storing into the real server (jailed as nobody when run as root).

Mail arrives byte-exact, the audit trail has the same rows as on SQLite, 250 comes
only after the commit; no server at start is 421 (inetd) or a one-line refusal
(serve); a server that stops mid-session costs 451, never a 250 and never half a
message, and intake recovers by itself when it is back (on a private server, so the
shared one stays up for everyone else).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from smapq.smtp import replies as R
from smapq.store.intake_postgresql import libpq_url
from tests.conftest import Spool, make_spool, program, root_only
from tests.pgdb import create_schema
from tests.pgprivate import PrivateServer, available
from tests.receive.conftest import ROOT, TRANSPORTS, Rig
from tests.receive.superserver import Client, free_port, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

BODY = (
    b"Subject: t\r\n\r\n..leading dot\r\n"
    + bytes(range(1, 256)).replace(b"\r", b"").replace(b"\n", b"")
    + b"\r\nlast line\r\n"
)
STORED = BODY.replace(b"\r\n..", b"\r\n.")  # dot-unstuffed


def pg_spool(root: Path, url: str, extra: str = "") -> Spool:
    """A spool whose queue is ``url`` (``smapq init`` makes its tables)."""
    root.mkdir(mode=0o755, exist_ok=True)
    return make_spool(
        root, f"smap, smapd: database {url}\n{extra}", user="nobody" if ROOT else None
    )


def query(url: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(libpq_url(url)) as conn:
        return conn.execute(sql, args).fetchall()  # type: ignore[arg-type]


def send(c: Client, body: bytes = BODY, rcpts: int = 2) -> bytes:
    """One message on an open session (after EHLO); the reply to the final dot."""
    assert c.cmd(b"MAIL FROM:<a@b.c>").startswith(b"250")
    for i in range(rcpts):
        assert c.cmd(b"RCPT TO:<r%d@e.f>" % i).startswith(b"250")
    assert c.cmd(b"DATA") == R.R354_DATA
    c.send(body + b".\r\n")
    return c.reply()


def queue_id(reply: bytes) -> str:
    assert reply.startswith(b"250 "), reply
    return reply.split()[-1].decode()


def session(rig: Rig, messages: int = 1) -> list[str]:
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    ids = [queue_id(send(c)) for _ in range(messages)]
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert c.eof()
    return ids


def events_done(read: Callable[[str], list[tuple[object, ...]]], sessions: int) -> None:
    """Until every session's last event (disconnect) is written: the client is let go
    before it."""

    def done() -> bool:
        return len(read("SELECT id FROM events WHERE kind = 'disconnect'")) >= sessions

    wait_until(done, 120, "a session's last events are not written")


def normalised(rows: list[tuple[object, ...]], ids: list[str]) -> list[tuple[object, ...]]:
    """Event rows with what differs from run to run (times, ids, ports) replaced."""
    sid = {r[1] for r in rows}
    out = []
    for row in rows:
        text = repr(row[2:])
        for n, qid in enumerate(ids):
            text = text.replace(qid, f"<Q{n}>")
        for s in sid:
            text = text.replace(str(s), "<S>")
        out.append((row[0], re.sub(r"\b\d{4,5}\b", "<port>", text)))
    return out


EVENTS = (
    "SELECT kind, session_id, queue_id, client_addr, address, code, detail FROM events ORDER BY id"
)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_mail_is_stored_byte_exact_with_the_events_sqlite_has(
    rig_factory: Callable[..., Rig], open_dir: Path, pg_url: str, kind: str
) -> None:
    rig = rig_factory(kind=kind, spool=pg_spool(open_dir / "pg", pg_url))
    ids = session(rig, messages=2)
    rows = query(
        pg_url,
        "SELECT queue_id, state, body, size, mail_from, trace, helo, protocol"
        " FROM messages ORDER BY id",
    )
    assert [r[0] for r in rows] == ids
    for qid, state, body, size, mail_from, trace, helo, protocol in rows:
        assert (state, body, size, mail_from) == ("received", STORED, len(STORED), "a@b.c")
        assert f"id {qid}" in str(trace) and (helo, protocol) == ("client.example", "ESMTP")
    rcpts = query(
        pg_url,
        "SELECT m.queue_id, r.position, r.address FROM recipients r"
        " JOIN messages m ON m.id = r.message_id ORDER BY m.id, r.position",
    )
    assert rcpts == [(q, i, f"r{i}@e.f") for q in ids for i in range(2)]
    events_done(lambda sql: query(pg_url, sql), 1)

    # The same session into SQLite: the same rows, column for column.
    lite = rig_factory(kind=kind)
    lite_ids = session(lite, messages=2)
    lite_rows = lite.rows(EVENTS)
    pg_rows = query(pg_url, EVENTS)
    assert normalised(pg_rows, ids) == normalised(lite_rows, lite_ids)
    kinds = [r[0] for r in pg_rows]
    assert kinds[0] == "connect" and kinds[-1] == "disconnect"
    assert [r[2] for r in pg_rows if r[0] == "accept"] == ids


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_250_comes_only_after_the_commit(
    rig_factory: Callable[..., Rig], open_dir: Path, pg_url: str, kind: str
) -> None:
    """A lock holds the intake's INSERT: no reply until the commit is through."""
    rig = rig_factory(kind=kind, spool=pg_spool(open_dir / "pg", pg_url))
    dbname = pg_url.rsplit("/", 1)[1]
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    with psycopg.connect(libpq_url(pg_url)) as blocker:
        blocker.execute("LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE")  # stops INSERTs
        assert c.cmd(b"MAIL FROM:<a@b.c>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<r@e.f>").startswith(b"250")
        assert c.cmd(b"DATA") == R.R354_DATA
        c.send(BODY + b".\r\n")

        def waiting() -> bool:
            return bool(
                query(
                    pg_url,
                    "SELECT 1 FROM pg_stat_activity WHERE datname = %s"
                    " AND application_name = 'smap' AND wait_event_type = 'Lock'",
                    dbname,
                )
            )

        wait_until(waiting, 120, "the intake's INSERT never waited for the lock")
        c.sock.setblocking(False)
        try:
            early = c.sock.recv(100, socket.MSG_PEEK)
        except BlockingIOError:
            early = b""
        c.sock.setblocking(True)
        assert early == b"", early  # nothing said yet: no 250 before the commit
        assert query(pg_url, "SELECT count(*) FROM messages") == [(0,)]
        blocker.rollback()
    qid = queue_id(c.reply())
    assert query(pg_url, "SELECT queue_id FROM messages") == [(qid,)]
    assert c.cmd(b"QUIT") == R.R221_BYE


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_the_receiver_needs_no_select(
    rig_factory: Callable[..., Rig], open_dir: Path, pg_url: str, kind: str
) -> None:
    """smap and serve as a role that may insert and read nothing (docs/postgresql-intake.md)."""
    spool = pg_spool(open_dir / "pg", pg_url)  # init as the owner
    role = f"smap_rx_{os.getpid()}_{kind}"
    grants = (
        f"CREATE ROLE {role} LOGIN",
        f"GRANT INSERT ON messages, recipients, events TO {role}",
        f"GRANT USAGE ON SEQUENCE messages_id_seq, recipients_id_seq, events_id_seq TO {role}",
    )
    with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
        for grant in grants:
            conn.execute(grant)  # type: ignore[arg-type]
    url = pg_url.replace("://postgres@", f"://{role}@")
    spool.table.write_text(spool.table.read_text().replace(pg_url, url))
    rig = rig_factory(kind=kind, spool=spool)
    try:
        ids = session(rig)
        events_done(lambda sql: query(pg_url, sql), 1)
        assert [r[0] for r in query(pg_url, "SELECT queue_id FROM messages")] == ids
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            query(url, "SELECT body FROM messages")
    finally:
        rig.server.stop()
        with psycopg.connect(libpq_url(pg_url), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")  # type: ignore[arg-type]
            conn.execute(f"DROP ROLE {role}")  # type: ignore[arg-type]


def test_with_the_jail_off_a_unix_socket_url_works(
    rig_factory: Callable[..., Rig], open_dir: Path, pg_url: str
) -> None:
    if not os.path.exists("/var/run/postgresql/.s.PGSQL.5432"):
        pytest.skip("the server has no Unix socket in /var/run/postgresql")
    spool = pg_spool(open_dir / "pg", pg_url, "smap: jail off\n")
    dbname = pg_url.rsplit("/", 1)[1]
    url = f"postgresql+psycopg://postgres@/{dbname}?host=/var/run/postgresql"
    spool.table.write_text(spool.table.read_text().replace(pg_url, url))
    ids = session(rig_factory(kind="inetd", spool=spool))
    assert [r[0] for r in query(pg_url, "SELECT queue_id FROM messages")] == ids


def unreachable(root: Path, url: str, extra: str = "") -> Spool:
    """A spool whose table names ``url`` (no server there: init could not have run)."""
    spool = make_spool(root, extra, user="nobody" if ROOT else None)
    with spool.table.open("a") as table:
        table.write(f"smap, smapd: database {url}\n")
    return spool


def test_no_server_at_start_is_421_and_logged(open_dir: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/smapq"
    log = open_dir / "smap.log"
    spool = unreachable(open_dir, url, f"smap: logfile {log}\n")
    proc = subprocess.run(
        [program("smap"), "-t", str(spool.table)],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    data, err = proc.stdout, proc.stderr
    assert data.startswith(b"421 4.3.0 ") and data.count(b"\r\n") == 1
    assert proc.returncode == 75
    assert b"fwtksyserr: cannot connect to the queue database" in err
    assert "fwtksyserr: cannot connect to the queue database" in log.read_text()


def test_serve_refuses_to_start_without_its_server(open_dir: Path) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/smapq"
    spool = unreachable(open_dir, url)
    proc = spool.smapq("serve", "--listen", f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 75
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smapq: cannot connect to the queue database")


def test_a_unix_socket_url_is_refused_in_the_jail(open_dir: Path, pg_url: str) -> None:
    if not ROOT:
        pytest.skip("the jail needs root (CI runs as root)")
    dbname = pg_url.rsplit("/", 1)[1]
    url = f"postgresql+psycopg://postgres@/{dbname}?host=/var/run/postgresql"
    spool = pg_spool(open_dir, pg_url)
    spool.table.write_text(spool.table.read_text().replace(pg_url, url))
    proc = spool.smapq("serve", "--listen", f"127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 75
    assert "Unix-socket database URL cannot be reached from the jail" in proc.stderr
    done = subprocess.run(
        [program("smap"), "-t", str(spool.table)],
        input=b"QUIT\r\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.startswith(b"421 4.3.0 ") and done.returncode == 75


# --- a server that goes away and comes back (a private one) --------------------------


@pytest.fixture(scope="module")
def private() -> Iterator[PrivateServer]:
    if not available():
        pytest.skip("needs root and the PostgreSQL 15 binaries (CI has both)")
    with PrivateServer() as server:
        yield server


_serial = itertools.count()


@pytest.fixture
def private_url(private: PrivateServer) -> str:
    if not private.running():
        private.start()
    return private.create_database(f"q{os.getpid()}_{next(_serial)}")


def send_until_stored(c: Client) -> bytes:
    """Send until 250: right after the server is back the receiver may still be in its
    pause between connection attempts (RECONNECT_PAUSE) and answer 451."""
    deadline = time.monotonic() + 60
    while True:
        reply = send(c)
        if not reply.startswith(b"451 4.3.0 ") or time.monotonic() > deadline:
            return reply
        time.sleep(0.2)


def stored(url: str) -> list[tuple[object, ...]]:
    return query(url, "SELECT queue_id, body FROM messages ORDER BY id")


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_server_stopped_mid_session_is_451_never_250_then_recovers(
    rig_factory: Callable[..., Rig],
    open_dir: Path,
    private: PrivateServer,
    private_url: str,
    kind: str,
) -> None:
    rig = rig_factory(kind=kind, spool=pg_spool(open_dir / "pg", private_url))
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    first = queue_id(send(c))  # the connection works
    assert c.cmd(b"MAIL FROM:<a@b.c>").startswith(b"250")
    assert c.cmd(b"RCPT TO:<x@e.f>").startswith(b"250")
    assert c.cmd(b"DATA") == R.R354_DATA
    c.send(b"Subject: lost\r\n\r\nnever half stored\r\n")
    private.stop("fast")  # clients are cut off (57P01) while this message is in DATA
    c.send(b".\r\n")
    reply = c.reply()
    assert reply.startswith(b"451 4.3.0 "), reply
    assert send(c).startswith(b"451 4.3.0 ")  # still down: 451 again, never 250
    private.start()
    # Back: the same session (inetd: reconnecting inside the jail) and new ones store
    # again, with nobody restarting anything.
    again = queue_id(send_until_stored(c))
    assert c.cmd(b"QUIT") == R.R221_BYE
    c.close()
    later = session(rig)
    got = stored(private_url)
    assert [r[0] for r in got] == [first, again, *later]
    assert all(bytes(r[1]) == STORED for r in got)  # type: ignore[arg-type]


def test_serve_writer_survives_a_server_restart_between_sessions(
    rig_factory: Callable[..., Rig], open_dir: Path, private: PrivateServer, private_url: str
) -> None:
    rig = rig_factory(kind="serve", spool=pg_spool(open_dir / "pg", private_url))
    first = session(rig)
    workers = rig.server.children(running=True)
    private.restart("immediate")  # a crash: the writer's idle connection is dead
    # The writer notices at the first statement and reconnects; while the server is
    # still in crash recovery it answers 451 (nothing stored) and tries again.
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    second = [queue_id(send_until_stored(c))]
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert rig.server.children(running=True) == workers  # no worker was replaced
    assert [r[0] for r in stored(private_url)] == [*first, *second]


@root_only
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_service_file_url_works_in_the_jail_and_reconnects_without_the_file(
    rig_factory: Callable[..., Rig],
    open_dir: Path,
    private: PrivateServer,
    private_url: str,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``?service=`` with host, port, database and user only in pg_service.conf (root's,
    read before the jail): the jailed receiver takes mail, and after a server restart
    reconnects from inside the jail, where the file is not, with what it pinned."""
    dbname = private_url.rsplit("/", 1)[1]
    services = open_dir / "pg_service.conf"
    services.write_text(
        f"[smapq]\nhost=127.0.0.1\nport={private.port}\ndbname={dbname}\nuser=postgres\n"
    )
    services.chmod(0o600)
    monkeypatch.setenv("PGSERVICEFILE", str(services))  # inherited by serve and inetd
    spool = pg_spool(open_dir / "pg", private_url)
    spool.table.write_text(
        spool.table.read_text().replace(private_url, "postgresql+psycopg://?service=smapq")
    )
    rig = rig_factory(kind=kind, spool=spool)
    c = rig.client()
    assert c.cmd(b"EHLO client.example").startswith(b"250-")
    first = queue_id(send(c))
    private.restart("fast")  # the receiver's connection is cut: it must connect again
    again = queue_id(send_until_stored(c))
    assert c.cmd(b"QUIT") == R.R221_BYE
    assert [r[0] for r in stored(private_url)] == [first, again]


def greeting(rig: Rig) -> bytes:
    """The first reply of a new connection; a session that was let in is ended."""
    c = rig.client(banner=False)
    reply = c.reply()
    if reply.startswith(b"220 "):
        assert c.cmd(b"QUIT").startswith(b"221 ")
    assert c.eof()
    c.close()
    return reply


def test_serve_turns_clients_away_while_its_server_is_down_and_recovers(
    rig_factory: Callable[..., Rig], open_dir: Path, private: PrivateServer, private_url: str
) -> None:
    """Workers that start while the server is down (a reload here; a replaced worker
    alike) stay up and answer every new client 421 4.3.0 at once -- instead of exiting
    to be replaced, again and again, while clients sit unanswered in the listen
    backlog -- and take mail again by themselves once the server is back."""
    rig = rig_factory(kind="serve", spool=pg_spool(open_dir / "pg", private_url))
    first = session(rig)
    old = set(rig.server.children(running=True))
    private.stop("fast")
    assert rig.server.proc is not None
    rig.server.proc.send_signal(signal.SIGHUP)  # a new generation of workers

    def replaced() -> bool:
        now = set(rig.server.children(running=True))
        return bool(now) and not now & old

    wait_until(replaced, 120, "the reload did not replace the workers")
    workers = rig.server.children(running=True)
    # The first client may come while the new writer is still trying its first connect.
    wait_until(lambda: greeting(rig).startswith(b"421 "), 120, "no 421 while the server is down")
    for _ in range(3):
        reply = greeting(rig)
        assert reply.startswith(b"421 4.3.0 "), reply
    assert rig.server.children(running=True) == workers  # no worker was replaced
    private.start()
    wait_until(lambda: greeting(rig).startswith(b"220 "), 120, "serve did not recover")
    later = session(rig)
    assert rig.server.children(running=True) == workers
    assert [r[0] for r in stored(private_url)] == [*first, *later]


JAILED_RECONNECT = """
import os, sys
from smapq.intake.port import Submission
from smapq.store.intake_postgresql import PostgresIntake
store = PostgresIntake(sys.argv[1])  # as root, before the jail: reads PGPASSFILE
del os.environ["PGPASSFILE"]
os.chroot(sys.argv[2]); os.chdir("/"); os.setgroups([]); os.setgid(65534); os.setuid(65534)
store.close()  # as if the server had dropped us: the next batch connects in the jail
row = {"at": 1.0, "kind": "connect", "session_id": "S", "queue_id": None,
       "client_addr": None, "address": None, "code": None, "detail": None}
print(store.accept([Submission(None, (), [row])]))
"""


@root_only
def test_a_passfile_password_serves_reconnects_inside_the_jail(
    private: PrivateServer, private_url: str, open_dir: Path
) -> None:
    """No password in the netperm-table: libpq's passfile is read before the jail, and
    a reconnect from inside the (empty) jail still authenticates."""
    dbname = private_url.rsplit("/", 1)[1]
    create_schema(private_url)
    role = f"smap_pw_{os.getpid()}"
    private.sql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    private.sql(f"GRANT INSERT ON events TO {role}", dbname)
    private.sql(f"GRANT USAGE ON SEQUENCE events_id_seq TO {role}", dbname)
    private.hba(f"host all {role} 127.0.0.1/32 scram-sha-256")
    passfile = open_dir / "pgpass"
    passfile.write_text(f"127.0.0.1:{private.port}:*:{role}:pw-{role}\n")
    passfile.chmod(0o600)
    jail = open_dir / "jail"
    jail.mkdir(mode=0o755)
    url = private_url.replace("://postgres@", f"://{role}@")
    done = subprocess.run(
        [
            os.path.join(os.path.dirname(program("smap")), "python"),
            "-c",
            JAILED_RECONNECT,
            url,
            str(jail),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PGPASSFILE": str(passfile), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[None]"
    assert query(private_url, "SELECT kind FROM events") == [("connect",)]
    # and without the passfile there is no way in (so the test above needed it)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq_url(url)).close()
