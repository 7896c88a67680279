"""The many-hosts rig as a fixture, and its figures in pytest's terminal summary.

The scenarios of tests/scale share one cluster (two receivers, four deliverers, one
private PostgreSQL, each host in its own network namespace): building it costs an
initdb and six spools. Each scenario sends Message-IDs of its own and checks only those,
so one scenario's leftovers cannot pass or fail another. What a scenario measured (how
many duplicates the kills caused, which replies the receivers gave while PostgreSQL was
down) is printed at the end of the run, pass or fail. SMAPQ_SCALE_KEEP=1 keeps the work
directory (logs, ledger, the PostgreSQL data directory) for a post-mortem.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.scale import rig


@pytest.fixture(scope="package")
def cluster() -> Iterator[rig.Cluster]:
    if os.geteuid() != 0:
        pytest.fail("the many-hosts scenarios need root (namespaces, a private PostgreSQL)")
    backend = os.environ.get("SMAPQ_SCALE_BACKEND", "postgres")
    workdir = rig.world_dir("smapq-scale-")
    made = rig.Cluster(
        workdir,
        backend,
        # The intake must make its own commit durable, whatever the server's default;
        # autovacuum off: its ring buffer would flush WAL during crash_unflushed.
        pg_settings={"synchronous_commit": "off", "wal_buffers": "'64MB'", "autovacuum": "off"},
    )
    rig.FIGURES.append(
        f"scale rig: {backend}, "
        + (
            f"each host in its own network namespace (bridge {made.net.gateway}/24)"
            if made.net.isolated
            else f"separate processes, no namespaces ({made.net.why_not})"
        )
        + f"; work directory {workdir}"
    )
    try:
        yield made
    finally:
        made.close()
        if not os.environ.get("SMAPQ_SCALE_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if rig.FIGURES:
        terminalreporter.section("many hosts (issue 9 item 8)")
        for line in rig.FIGURES:
            terminalreporter.write_line(line)
