"""``smapq report metrics``: the queue as Prometheus text exposition format 0.0.4.

Purpose: for node_exporter's textfile collector (write to a ``.prom`` file atomically:
``smapq report metrics > x.tmp && mv x.tmp /var/lib/node_exporter/x.prom``) or, with
``--listen``, a tiny HTTP endpoint serving ``/metrics``. Gauges come from ``messages``,
counters from the append-only ``events`` log, so they only go up (until events are
pruned by hand).

Security: read-only connection; the HTTP endpoint answers GET /metrics only, binds
where it is told (default 127.0.0.1) and runs as whoever started it.
"""

from __future__ import annotations

import http.server
from collections.abc import Callable

from sqlalchemy import Connection

from smapq.store import queries, states

ATTEMPT_BUCKETS = (0, 1, 2, 3, 5, 10, 20)
# (metric suffix, event kind, help)
COUNTERS = (
    ("sessions_total", "connect", "SMTP connections accepted by the receiver."),
    ("accepted_total", "accept", "Messages accepted (250 after DATA)."),
    ("refused_total", "reject", "SMTP commands refused by the receiver."),
    ("deliveries_total", "delivered", "Messages delivered by sendmail."),
    ("deferrals_total", "deferred", "Delivery attempts that failed temporarily."),
    ("failures_total", "bad", "Messages that failed permanently (state bad)."),
    ("recoveries_total", "recovered", "Claims taken back after an expired lease."),
    ("bounces_total", "bounced", "Failure notices (DSNs) queued to senders."),
    ("delay_warnings_total", "warned", "Delay warnings (DSNs) queued to senders."),
)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    out.append(f"# HELP smapq_{name} {help_text}")
    out.append(f"# TYPE smapq_{name} {kind}")


def render(conn: Connection, now: float) -> str:
    """The whole exposition as one string (small: a few dozen lines)."""
    out: list[str] = []
    totals = dict.fromkeys(states.STATES, (0, 0))
    for state, n, size in queries.report_state_totals(conn, None, None):
        totals[str(state)] = (int(n), int(size))
    _family(out, "messages", "gauge", "Messages in the queue database by state.")
    out += [f'smapq_messages{{state="{s}"}} {totals[s][0]}' for s in states.STATES]
    _family(out, "message_bytes", "gauge", "Message sizes in the queue database by state.")
    out += [f'smapq_message_bytes{{state="{s}"}} {totals[s][1]}' for s in states.STATES]
    _family(out, "deferred_messages", "gauge", "Messages waiting for a retry.")
    out.append(f"smapq_deferred_messages {queries.report_deferred_count(conn)}")
    oldest = queries.report_oldest_waiting(conn)
    _family(
        out,
        "oldest_waiting_age_seconds",
        "gauge",
        "Age of the oldest message not yet delivered or bad (0: none).",
    )
    out.append(f"smapq_oldest_waiting_age_seconds {0.0 if oldest is None else now - oldest:.3f}")

    _family(out, "waiting_attempts", "histogram", "Delivery attempts of waiting messages.")
    hist = {int(a): int(n) for a, n in queries.report_attempts_histogram(conn)}
    total = sum(hist.values())
    for le in ATTEMPT_BUCKETS:
        count = sum(n for a, n in hist.items() if a <= le)
        out.append(f'smapq_waiting_attempts_bucket{{le="{le}"}} {count}')
    out.append(f'smapq_waiting_attempts_bucket{{le="+Inf"}} {total}')
    out.append(f"smapq_waiting_attempts_sum {sum(a * n for a, n in hist.items())}")
    out.append(f"smapq_waiting_attempts_count {total}")

    counts = queries.report_event_totals(conn, [kind for _, kind, _ in COUNTERS])
    for name, kind, help_text in COUNTERS:
        _family(out, name, "counter", help_text)
        out.append(f"smapq_{name} {counts[kind]}")
    return "\n".join(out) + "\n"


def serve(host: str, port: int, scrape: Callable[[], str]) -> None:
    """Serve ``GET /metrics`` forever, calling ``scrape`` for each request."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            try:
                body = scrape().encode()
            except Exception as exc:  # report it to the scraper, keep serving
                self.send_error(503, str(exc).splitlines()[0] if str(exc) else "error")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer((host, port), Handler) as server:
        server.serve_forever()
