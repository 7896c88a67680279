"""``smapq import-spool DIR`` on real FWTK smap spool files (layout from smap.c 1.6)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from smapq.report import importspool
from tests.conftest import Spool, program, write_table
from tests.deliver.kit import Queue, StandIn, standin, stop, wait_for
from tests.report.conftest import Filled, on_a_terminal

RECEIVED = (
    b"Received: from mail.example.net(192.0.2.44) by fw.example.com via smap (V2.1)\n"
    b"\tid smaA01234; Tue Nov  1 12:00:00 1994\n"
)
__all__ = ["standin"]

BODY = b"Subject: old mail\nFrom: a@example.net\n\nline one\n.\n..dots\nlast\n"


def spool_file(
    directory: Path,
    name: str,
    *,
    sender: bytes = b"<a@example.net>",
    rcpts: tuple[bytes, ...] = (b"<z@example.com>", b"<y@example.com>"),
    body: bytes = RECEIVED + BODY,
    mode: int = 0o700,
    raw: bytes | None = None,
) -> Path:
    """A spool file as smap leaves it: RCPT lines in reverse order, 0700 when complete."""
    path = directory / name
    if raw is None:
        raw = b"FROM " + sender + b"\n"
        raw += b"".join(b"RCPT " + r + b"\n" for r in rcpts)
        raw += b"BODY\n" + body
    path.write_bytes(raw)
    path.chmod(mode)
    return path


def rows(filled: Filled) -> list[tuple[object, ...]]:
    with filled.engine.connect() as conn:
        from sqlalchemy import text

        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT queue_id, state, mail_from, client_addr, client_name, trace, body, "
                    "size FROM messages WHERE queue_id NOT LIKE 'M%' ORDER BY id"
                )
            )
        ]


def recipients_of(filled: Filled, qid: object) -> list[str]:
    with filled.engine.connect() as conn:
        from sqlalchemy import text

        return [
            str(a)
            for (a,) in conn.execute(
                text(
                    "SELECT address FROM recipients r JOIN messages m ON m.id = r.message_id "
                    "WHERE m.queue_id = :q ORDER BY position"
                ),
                {"q": qid},
            )
        ]


def test_complete_file_is_imported_with_trace_apart_from_body(
    filled: Filled, tmp_path: Path
) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    spool_file(spool, "smaA01234")
    result = filled.smapq("import-spool", str(spool))
    assert "imported 1, already imported 0, left 0" in result.stderr
    (row,) = rows(filled)
    qid, state, sender, addr, name, trace, body, size = row
    assert state == "received" and sender == "a@example.net"
    assert (addr, name) == ("192.0.2.44", "mail.example.net")
    assert trace == RECEIVED.decode()
    assert body == BODY and size == len(BODY)
    # smap wrote RCPT lines in reverse order; the import restores the SMTP order.
    assert recipients_of(filled, qid) == ["y@example.com", "z@example.com"]
    assert not (spool / "smaA01234").exists()
    assert (spool / "imported" / "smaA01234").exists()
    # What the deliverer will hand to sendmail is byte-for-byte the old spool's data.
    export = filled.smapq("queue", "export", str(qid)).stdout
    assert export.encode() == RECEIVED + BODY


def test_rerun_imports_nothing_twice(filled: Filled, tmp_path: Path) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    original = spool_file(spool, "smaB00001").read_bytes()
    filled.smapq("import-spool", str(spool))
    again = filled.smapq("import-spool", str(spool))
    assert "imported 0, already imported 0, left 0" in again.stderr
    # A crash after the commit but before the move leaves the file in place: a re-run
    # must recognise it (name + SHA-256) and only move it.
    (spool / "smaB00001").write_bytes(original)
    (spool / "smaB00001").chmod(0o700)
    third = filled.smapq("import-spool", str(spool))
    assert "imported 0, already imported 1" in third.stderr
    assert len(rows(filled)) == 1
    assert sorted(p.name for p in (spool / "imported").iterdir()) == ["smaB00001", "smaB00001.1"]


def test_incomplete_locked_and_malformed_files_are_reported_and_left(
    filled: Filled, tmp_path: Path
) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    spool_file(spool, "smaINCOMPL", mode=0o600)
    locked = spool_file(spool, "smaLOCKED1")
    spool_file(spool, "smaNOFROM1", raw=b"RCPT <a@b>\nBODY\nx\n")
    spool_file(spool, "smaNORCPT1", raw=b"FROM <a@b>\nBODY\nx\n")
    spool_file(spool, "smaNOBODY1", raw=b"FROM <a@b>\nRCPT <c@d>\n")
    spool_file(spool, "smaGOOD001")
    (spool / ".smaHIDDEN").write_bytes(b"x")
    (spool / "notsmap").write_bytes(b"x")
    fd = os.open(locked, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # smap's lock_fd, held while it writes
        result = filled.smapq("import-spool", str(spool), check=False)
    finally:
        os.close(fd)
    assert result.returncode == 1
    out = result.stdout
    assert "smaINCOMPL: incomplete: mode 0600" in out
    assert "smaLOCKED1: locked" in out
    assert "smaNOFROM1: malformed: does not start with FROM" in out
    assert "smaNORCPT1: malformed: no usable RCPT line" in out
    assert "smaNOBODY1: malformed: no BODY line" in out
    assert "imported 1, already imported 0, left 5" in result.stderr
    assert "5 malformed" not in result.stderr and "3 malformed file(s)" in result.stderr
    left = sorted(p.name for p in spool.iterdir() if p.is_file())
    assert left == [
        ".smaHIDDEN",
        "notsmap",
        "smaINCOMPL",
        "smaLOCKED1",
        "smaNOBODY1",
        "smaNOFROM1",
        "smaNORCPT1",
    ]
    # Once smap finishes (chmod 0700, unlock) the next run picks them up.
    (spool / "smaINCOMPL").chmod(0o700)
    later = filled.smapq("import-spool", str(spool), check=False)
    assert "imported 2" in later.stderr


def test_option_recipients_are_dropped_like_smapd(filled: Filled, tmp_path: Path) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    spool_file(spool, "smaDASH001", rcpts=(b"<-oQ/tmp/x>", b"<ok@example.com>"))
    spool_file(spool, "smaPLAIN01")
    # Said without --verbose: a dropped recipient is mail that will not arrive.
    result = filled.smapq("import-spool", str(spool))
    assert "dropped recipient(s) starting with '-': -oQ/tmp/x" in result.stdout
    assert "smaPLAIN01" not in result.stdout
    assert sorted(recipients_of(filled, r[0]) for r in rows(filled)) == [
        ["ok@example.com"],
        ["y@example.com", "z@example.com"],
    ]


def test_dry_run_changes_nothing(filled: Filled, tmp_path: Path) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    spool_file(spool, "smaDRY0001")
    before = filled.fingerprint()
    result = filled.smapq("import-spool", "--dry-run", str(spool))
    assert "would import 1" in result.stderr
    assert filled.fingerprint() == before
    assert (spool / "smaDRY0001").exists() and not (spool / "imported").exists()


def test_progress_on_a_terminal_only(filled: Filled, tmp_path: Path) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    first = spool_file(spool, "sma0000000")
    for i in range(1, 300):
        shutil.copyfile(first, spool / f"sma{i:07d}")
        (spool / f"sma{i:07d}").chmod(0o700)
    cmd = [program("smapq"), "-t", str(filled.spool.table), "import-spool"]
    code, _, terminal = on_a_terminal([*cmd, str(spool), "--dry-run"])
    assert code == 0
    # One line rewritten in place, then erased before the summary.
    assert "\rimport-spool: 300/300 files\x1b[K" in terminal
    assert "\r\x1b[Kimport-spool: would import 300" in terminal
    quiet = on_a_terminal([*cmd, str(spool), "--dry-run", "--quiet"])[2]
    assert "files" not in quiet and "would import 300" in quiet
    # As from cron: stderr is not a terminal, so only the result line.
    result = filled.smapq("import-spool", str(spool))
    assert result.stderr.splitlines() == [
        "import-spool: imported 300, already imported 0, left 0 (incomplete 0, locked 0, "
        "malformed 0)"
    ]
    assert filled.scalar("SELECT count(*) FROM messages WHERE queue_id NOT LIKE 'M%'") == 300


def test_imported_mail_wakes_a_waiting_deliverer(
    spool: Spool, tmp_path: Path, standin: StandIn
) -> None:
    """The import's commit is news to a deliverer that only waits for news (wakeup
    3600): NOTIFY on PostgreSQL, SQLite's data_version; it sends the old spool's bytes."""
    # The ``spool`` fixture, not make_queue: it names the backend explicitly.
    table = spool.table.read_text() + f"smapd: sendmail {standin.path}\nsmapd: wakeup 3600\n"
    write_table(spool.table, table)
    q = Queue(spool, str(standin.path))
    daemon = q.start_daemon()
    try:
        first = q.add(["first@x.example"])  # delivered: the daemon is up and waiting
        wait_for(lambda: q.row(first).state == "delivered", what="the first delivery")
        old = tmp_path / "smap"
        old.mkdir()
        spool_file(old, "smaD00001")
        result = spool.smapq("import-spool", str(old))
        assert "imported 1," in result.stderr
        wait_for(lambda: len(standin.calls()) == 2, what="the imported message's delivery")
    finally:
        code, err = stop(daemon)
    assert code == 0, err
    call = standin.calls()[1]
    assert call.recipients == ["y@example.com", "z@example.com"]
    assert call.stdin == RECEIVED + BODY


def test_one_import_per_spool_at_a_time(filled: Filled, tmp_path: Path) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    spool_file(spool, "smaC00001")
    fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent import-spool holds it
        result = filled.smapq("import-spool", str(spool), check=False)
    finally:
        os.close(fd)
    assert result.returncode == 64
    assert result.stderr.strip().endswith("another import-spool is running")
    assert (spool / "smaC00001").exists() and rows(filled) == []


def test_missing_directory_is_one_line(filled: Filled, tmp_path: Path) -> None:
    result = filled.smapq("import-spool", str(tmp_path / "nope"), check=False)
    assert result.returncode == 64
    assert result.stderr.strip().endswith("nope: not a directory")


def test_imported_dir_elsewhere_is_refused_before_anything_changes(
    filled: Filled, tmp_path: Path
) -> None:
    """Files are renamed into it: another filesystem used to fail after the commit,
    with a traceback, on every run."""
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem at /dev/shm")
    target = Path(tempfile.mkdtemp(dir=other))
    try:
        spool = tmp_path / "smap"
        spool.mkdir()
        spool_file(spool, "smaXDEV001")
        before = filled.fingerprint()
        result = filled.smapq(
            "import-spool", "--imported-dir", str(target), str(spool), check=False
        )
        assert result.returncode == 64
        assert result.stderr.strip().endswith("imported files are renamed there")
        assert len(result.stderr.strip().splitlines()) == 1
        assert filled.fingerprint() == before and (spool / "smaXDEV001").exists()
    finally:
        shutil.rmtree(target)


def test_a_file_that_cannot_be_moved_is_one_line_and_moved_by_the_next_run(
    filled: Filled, tmp_path: Path
) -> None:
    spool = tmp_path / "smap"
    spool.mkdir()
    name = "sma" + "M" * 252  # 255 bytes: NAME_MAX
    spool_file(spool, name)
    done = spool / "imported"
    done.mkdir()
    (done / name).mkdir()  # taken, so the mover tries NAME.1: too long, even for root
    result = filled.smapq("import-spool", str(spool), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"smapq: {name}: imported, but cannot move it to ")
    assert "Traceback" not in result.stderr
    assert len(rows(filled)) == 1 and (spool / name).exists()
    (done / name).rmdir()
    again = filled.smapq("import-spool", str(spool))
    assert "imported 0, already imported 1" in again.stderr
    assert len(rows(filled)) == 1 and not (spool / name).exists()


def test_parse_units() -> None:
    msg = importspool.parse(b"FROM  <> SIZE=10\nRCPT <a@b>\n  RCPT <c@d>\nBODY\nno trace\n")
    assert msg.mail_from == "" and msg.rcpts == ["c@d", "a@b"]
    assert msg.trace == "" and msg.body == b"no trace\n"
    assert importspool.address("<x@y> BODY=8BITMIME") == "x@y"
    assert importspool.address("x@y") == "x@y"
