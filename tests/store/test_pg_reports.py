"""Reports on the real PostgreSQL, where its path differs from SQLite's.

Every report, verb and ``report sql`` check in tests/report runs on both backends (the
``filled`` fixture); what is left here has no SQLite counterpart: latency percentiles
computed by the server.
"""

from __future__ import annotations

import time

import pytest

from smapq.store.engine import make_engine


@pytest.mark.parametrize("step", [3600, 86400])
def test_server_percentiles_are_the_reports_nearest_rank(pg_queue: str, step: int) -> None:
    """PostgreSQL computes latency percentiles itself; they equal the Python rule the
    SQLite path applies to the streamed rows, period by period, to the last bit."""
    import random

    from smapq.report import reports
    from smapq.store import queries

    rnd = random.Random(9)
    now = time.time()
    engine = make_engine(pg_queue)
    with engine.begin() as conn:
        for n in range(400):
            received = now - rnd.uniform(0, 3 * 86400)
            qid = f"L{n}"
            queries.insert_message(
                conn,
                {
                    "queue_id": qid,
                    "protocol": "ESMTP",
                    "mail_from": "a@b",
                    "size": 1,
                    "trace": "",
                    "body": b"x",
                    "body_sha256": "0" * 64,
                    "received_at": received,
                },
                ["r@x"],
            )
            conn.exec_driver_sql(
                "UPDATE messages SET state = 'delivered', delivered_at = %(d)s "
                "WHERE queue_id = %(q)s",
                {"d": received + rnd.expovariate(1 / 30.0) * rnd.choice((1, 1, 1, 50)), "q": qid},
            )
    # All time, and a window whose edges cut periods in two.
    windows = [(None, None), (now - 1.5 * 86400 + 17.5, now - 0.3 * 86400)]
    with engine.connect() as conn:
        for since, until in windows:
            served = queries.report_latency_periods(conn, since, until, step)
            assert served is not None
            streamed = list(
                reports._latency_rows(
                    conn.exec_driver_sql(
                        "SELECT delivered_at, delivered_at - received_at FROM messages "
                        "WHERE delivered_at IS NOT NULL AND delivered_at >= %(s)s "
                        "AND delivered_at < %(u)s ORDER BY delivered_at",
                        {
                            "s": -1.0 if since is None else since,
                            "u": 1e18 if until is None else until,
                        },
                    ).all(),
                    step,
                )
            )
            assert [tuple(r) for r in served] == streamed, (since, until)
            assert len(streamed) > 1
        assert queries.report_latency_periods(conn, now + 86400, None, step) == []
    engine.dispose()
