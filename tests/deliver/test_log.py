"""Deliverer logging: syslog through /dev/log when it exists, stderr always."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

import pytest

from smapq.deliver import log
from tests.conftest import program
from tests.deliver.kit import StandIn, make_queue, standin

__all__ = ["standin"]


def test_syslog_gets_the_mail_facility(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(path))
        logger = log.setup(dev_log=str(path))
        try:
            logger.info("hello syslog")
            data = sink.recv(4096)
        finally:
            for handler in logger.handlers:
                handler.close()
            logger.handlers.clear()
    # <PRI> = facility mail (2) * 8 + severity info (6) = 22
    assert data.startswith(b"<22>smapd[")
    assert b"hello syslog" in data


def test_no_dev_log_means_stderr_only(tmp_path: Path) -> None:
    logger = log.setup(dev_log=str(tmp_path / "missing"))
    try:
        assert [type(h) for h in logger.handlers] == [logging.StreamHandler]
    finally:
        logger.handlers.clear()


@pytest.mark.usefixtures("backend")
def test_smapd_accepts_the_table_option(tmp_path: Path, standin: StandIn) -> None:
    q = make_queue(tmp_path, str(standin.path))
    qid = q.add(["a@x.example"])
    proc = subprocess.run(
        [program("smapq"), "deliver", "--once", "-t", str(q.spool.table)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert q.row(qid).state == "delivered"
