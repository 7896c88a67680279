"""Queue verbs and the deliverer's baddir copies: a message that leaves state bad, or the
database, takes its ``.eml`` and ``.envelope`` with it (FWTK's bad directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deliver.kit import Queue, StandIn, make_queue, standin

__all__ = ["standin"]

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("backend")]


@pytest.fixture
def q(tmp_path: Path, standin: StandIn) -> Queue:
    return make_queue(tmp_path, str(standin.path))


def went_bad(q: Queue) -> tuple[str, list[Path]]:
    qid = q.add(["exit67@x.example"])  # EX_NOUSER: permanent, so bad and exported
    assert q.deliver().returncode == 1
    files = [q.spool.baddir / f"{qid}.eml", q.spool.baddir / f"{qid}.envelope"]
    assert all(f.exists() for f in files) and q.row(qid).state == "bad"
    return qid, files


def test_delete_removes_the_baddir_copies(q: Queue) -> None:
    qid, files = went_bad(q)
    dry = q.spool.smapq("queue", "delete", "--dry-run", qid)
    assert f"{qid}: would go bad -> deleted (would remove 2 baddir file(s))" in dry.stdout
    assert all(f.exists() for f in files)
    out = q.spool.smapq("queue", "delete", qid)
    assert out.stdout.strip() == f"{qid}: bad -> deleted (2 baddir file(s) removed)"
    assert not any(f.exists() for f in files)
    assert q.row(qid) is None


def test_requeue_of_bad_mail_removes_the_copies_and_it_can_go_bad_again(q: Queue) -> None:
    qid, files = went_bad(q)
    out = q.spool.smapq("queue", "requeue", qid)
    assert out.stdout.strip() == f"{qid}: bad -> received (2 baddir file(s) removed)"
    assert not any(f.exists() for f in files)
    assert q.deliver().returncode == 1  # fails again: exported again
    assert all(f.exists() for f in files)


def test_a_copy_that_cannot_be_removed_is_reported_not_fatal(q: Queue) -> None:
    qid, files = went_bad(q)
    files[0].unlink()
    files[0].mkdir()  # unlink() of a directory fails: the copy stays, and we say so
    out = q.spool.smapq("queue", "delete", qid)
    assert out.returncode == 0
    assert "baddir copy left:" in out.stdout and str(files[0]) in out.stdout
    assert not files[1].exists() and q.row(qid) is None


def test_purge_of_bad_rows_removes_their_copies(q: Queue) -> None:
    qid, files = went_bad(q)
    q.spool.execute("UPDATE messages SET updated_at = 0 WHERE queue_id = :qid", qid=qid)
    out = q.spool.smapq("queue", "purge", "--older-than", "1d", "--bad")
    assert "1 baddir copies removed" in out.stdout
    assert not any(f.exists() for f in files)


def test_requeue_of_deferred_mail_says_deferred(q: Queue) -> None:
    qid = q.add(["exit75@x.example"])
    assert q.deliver().returncode == 75
    assert q.row(qid).attempts == 1 and q.row(qid).state == "received"
    out = q.spool.smapq("queue", "requeue", qid)
    assert out.stdout.strip() == f"{qid}: deferred -> received"
    fresh = q.add(["a@x.example"])
    q.spool.smapq("queue", "hold", fresh)
    q.spool.smapq("queue", "release", fresh)
    again = q.spool.smapq("queue", "requeue", fresh)
    assert again.stdout.strip() == f"{fresh}: received, due now"
