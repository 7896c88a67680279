"""The files in examples/ work as shipped: systemd and cron run the installed programs,
Prometheus accepts the rules and they fire when they should, and the Grafana dashboard
asks only for metrics smapq serves, in valid PromQL.

Real tools: ``systemd-analyze verify`` for the unit, ``promtool`` (Debian's prometheus
package; .ci/run installs it) for the rules and their unit tests, the installed
``smapd``/``smapq`` for what the unit and the cron lines run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Spool, program
from tests.deliver.kit import wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
RULES = EXAMPLES / "prometheus" / "smapq-rules.yml"
DASHBOARD = EXAMPLES / "grafana" / "smapq-dashboard.json"
# The README's install: the venv in /opt/smapq, the FWTK table path.
INSTALLED = "/opt/smapq/bin/"
TABLE = "/usr/local/etc/netperm-table"

pytestmark = pytest.mark.integration


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool (Debian package prometheus) is needed; .ci/run installs it"
    return path


def served_metric_names(spool: Spool) -> set[str]:
    text = spool.smapq("report", "metrics").stdout
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    kinds = {line.split()[2]: line.split()[3] for line in text.splitlines() if "# TYPE" in line}
    for name, kind in kinds.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bsmapq_[a-z_]+", expr))


# --- systemd and cron -----------------------------------------------------------------


def unit_lines(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_smapd_unit_verifies_and_runs_what_the_readme_installs(
    spool: Spool, tmp_path: Path
) -> None:
    unit = EXAMPLES / "systemd" / "smapd.service"
    keys = unit_lines(unit)
    (start,) = keys["ExecStart"]
    assert start == f"{INSTALLED}smapd -t {TABLE}"
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and keys["KillMode"] == ["mixed"]
    # systemd itself checks the unit, with the program where this venv has it.
    here = tmp_path / "smapd.service"
    here.write_text(unit.read_text().replace(INSTALLED, f"{BIN}/"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(here)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    # What systemd would run: start, reload (SIGHUP), stop (SIGTERM) -> exit 0.
    argv = shlex.split(start.replace(INSTALLED, f"{BIN}/").replace(TABLE, str(spool.table)))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # A reload while smapd still imports (its entry point holds the signal from its
        # first line): it must stay pending, not kill it.
        wait_for(lambda: holds(proc.pid, signal.SIGHUP, "SigBlk:") or proc.poll() is not None)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: holds(proc.pid, signal.SIGHUP) or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def holds(pid: int, sig: int, field: str = "SigCgt:") -> bool:
    """Whether process ``pid`` catches ``sig`` (SigCgt: a handler is installed) or
    blocks it (SigBlk), from /proc/PID/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith(field):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def cron_jobs(path: Path) -> list[tuple[str, str]]:
    """(user, command) of every job line, the commented-out alternative included."""
    jobs = []
    for line in path.read_text().splitlines():
        text = line[1:] if line.startswith("#*") else line
        if not text or text.startswith("#") or re.match(r"^[A-Z]+=", text):
            continue
        fields = text.split(None, 6)
        assert len(fields) == 7, f"not 5 time fields, a user and a command: {line!r}"
        for f in fields[:5]:
            assert re.fullmatch(r"[0-9*/,-]+", f), line
        jobs.append((fields[5], fields[6]))
    return jobs


def test_cron_lines_run(spool: Spool, tmp_path: Path) -> None:
    jobs = cron_jobs(EXAMPLES / "cron.d" / "smapq")
    assert [u for u, _ in jobs] == ["root"] * 3
    mailed = tmp_path / "mailed"
    fake_mail = tmp_path / "bin" / "mail"
    fake_mail.parent.mkdir()
    fake_mail.write_text(f'#!/bin/sh\necho "$@" > {mailed}.args\ncat > {mailed}\n')
    fake_mail.chmod(0o755)
    env = {
        "PATH": f"{fake_mail.parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "SMAPQ_TABLE": str(spool.table),
    }
    for _, command in jobs:
        assert INSTALLED in command
        proc = subprocess.run(
            ["/bin/sh", "-c", command.replace(INSTALLED, f"{BIN}/")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        # cron mails any output: a quiet job prints nothing.
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", ""), command
    assert mailed.read_text().startswith("smapq daily report for ")
    assert "smapq daily report postmaster" in (tmp_path / "mailed.args").read_text()


# --- Prometheus and Grafana ----------------------------------------------------------


def test_alert_rules_check_and_use_served_metrics(spool: Spool) -> None:
    proc = subprocess.run(
        [promtool(), "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    used = metric_names(RULES.read_text())
    assert used and used <= served_metric_names(spool), used - served_metric_names(spool)


def _alert(name: str, at: str, **annotations: str) -> dict[str, Any]:
    labels = {"severity": "warning", "instance": "mx1", "job": "smapq"}
    return {
        "eval_time": at,
        "alertname": name,
        "exp_alerts": [{"exp_labels": labels, "exp_annotations": annotations}]
        if annotations
        else [],
    }


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    series = 'smapq_{}{{instance="mx1",job="smapq"}}'
    tests = [
        {  # the oldest message ages a minute per minute: over 2 h for 15 m at 2h15m
            "interval": "1m",
            "input_series": [
                {"series": series.format("oldest_waiting_age_seconds"), "values": "0+60x200"}
            ],
            "alert_rule_test": [
                _alert("SmapqOldestWaitingMessage", "2h10m"),
                _alert(
                    "SmapqOldestWaitingMessage",
                    "2h30m",
                    summary="smapq: a message has waited 2h 30m 0s",
                    description="Run 'smapq queue' and 'smapq report deferred' on mx1.",
                ),
            ],
        },
        {  # one failure at minute 10
            "interval": "1m",
            "input_series": [{"series": series.format("failures_total"), "values": "0x9 1x60"}],
            "alert_rule_test": [
                _alert("SmapqBadMail", "5m"),
                _alert(
                    "SmapqBadMail",
                    "20m",
                    summary="smapq: 1 message(s) went bad in 30 minutes",
                    description="Run 'smapq report bad'; requeue with 'smapq queue requeue ID'.",
                ),
                _alert("SmapqBadMail", "60m"),
            ],
        },
        {  # 0.4 refusals/s against 0.5 connections/s: fires after 10 m
            "interval": "1m",
            "input_series": [
                {"series": series.format("refused_total"), "values": "0+24x60"},
                {"series": series.format("sessions_total"), "values": "0+30x60"},
            ],
            "alert_rule_test": [
                _alert(
                    "SmapqRefusalRate",
                    "30m",
                    summary="smapq: 0.40 refusals/s",
                    description="Run 'smapq report refused --since 1h' on mx1.",
                )
            ],
        },
        {  # the same refusals among 2 connections/s: a busy server, no alert
            "interval": "1m",
            "input_series": [
                {"series": series.format("refused_total"), "values": "0+24x60"},
                {"series": series.format("sessions_total"), "values": "0+120x60"},
            ],
            "alert_rule_test": [_alert("SmapqRefusalRate", "30m")],
        },
    ]
    spec = tmp_path / "rules-test.yml"  # JSON is YAML
    spec.write_text(json.dumps({"rule_files": [str(RULES)], "tests": tests}))
    proc = subprocess.run(
        [promtool(), "test", "rules", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_queries_are_valid_promql_on_served_metrics(
    spool: Spool, tmp_path: Path
) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["__inputs"][0]["name"] == "DS_PROMETHEUS"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs and all(p["title"] and p["description"] for p in panels)
    used = set().union(*(metric_names(e) for e in exprs))
    served = served_metric_names(spool)
    assert used <= served, used - served
    # Each query, with Grafana's variables filled in, as a recording rule promtool parses.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": e.replace("$instance", ".*").replace("$__rate_interval", "5m"),
                    }
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_examples_name_the_installed_programs() -> None:
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file():
            for prog in re.findall(r"/opt/smapq/bin/([a-z-]+)", path.read_text()):
                assert os.path.exists(program(prog)), f"{path}: no program {prog}"


@pytest.mark.usefixtures("backend")
def test_serve_units_verify_and_serve_under_socket_activation(
    open_dir: Path, tmp_path: Path
) -> None:
    """smapq-serve.socket (Accept=no) + smapq-serve.service: systemd checks both, and
    the service's command serves mail from the sockets socket activation passes."""
    from tests.receive.conftest import spool_for_receiver
    from tests.receive.superserver import SOCKET_ACTIVATE, Client, free_port

    spool = spool_for_receiver(open_dir)  # as root: jailed as nobody, as installed

    socket_unit = EXAMPLES / "systemd" / "smapq-serve.socket"
    service = EXAMPLES / "systemd" / "smapq-serve.service"
    assert unit_lines(socket_unit)["Accept"] == ["no"]
    (start,) = unit_lines(service)["ExecStart"]
    assert start.startswith(f"{INSTALLED}smapq -t {TABLE} serve ")
    for unit in (socket_unit, service):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, f"{BIN}/"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / service.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    port = free_port()
    argv = shlex.split(start.replace(INSTALLED, f"{BIN}/").replace(TABLE, str(spool.table)))
    argv[argv.index("--grace") + 1] = "1"
    proc = subprocess.Popen(
        [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import socket

        def connect() -> socket.socket | None:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=60)
            except ConnectionRefusedError:  # systemd-socket-activate is not bound yet
                assert proc.poll() is None
                return None

        c = Client(wait_for(connect, what="the socket is not bound"))
        assert c.reply().startswith(b"220 ")
        c.cmd(b"EHLO c")
        c.cmd(b"MAIL FROM:<a@b.c>")
        c.cmd(b"RCPT TO:<d@e.f>")
        c.cmd(b"DATA")
        assert c.cmd(b"hi\r\n.").startswith(b"250 ")
        c.cmd(b"QUIT")
        c.close()
        proc.send_signal(signal.SIGHUP)  # ExecReload
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
