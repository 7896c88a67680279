"""Prometheus metrics, the optional HTTP endpoint, and help text on every command."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import click
import pytest

from smapq_cli.main import cli
from tests.conftest import program
from tests.report.conftest import Filled


def parse_exposition(text: str) -> dict[str, float]:
    """sample name{labels} -> value; checks every family has HELP and TYPE first."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif line.startswith("# HELP "):
            continue
        else:
            name, value = line.rsplit(" ", 1)
            family = name.split("{")[0]
            base = family.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
            assert family in typed or base in typed, line
            samples[name] = float(value)
    return samples


def test_metrics_text_format(filled: Filled) -> None:
    out = filled.smapq("report", "metrics").stdout
    s = parse_exposition(out)
    assert s['smapq_messages{state="received"}'] == 2
    assert s['smapq_messages{state="delivered"}'] == 2
    assert s['smapq_messages{state="held"}'] == 1
    assert s["smapq_deferred_messages"] == 1
    assert 29 * 60 <= s["smapq_oldest_waiting_age_seconds"] < 40 * 60
    # Waiting: M3 (2 attempts), M5 (0), M6, M7 (1 each), M8 (0).
    assert s['smapq_waiting_attempts_bucket{le="0"}'] == 2
    assert s['smapq_waiting_attempts_bucket{le="1"}'] == 4
    assert s['smapq_waiting_attempts_bucket{le="+Inf"}'] == 5
    assert s["smapq_waiting_attempts_count"] == 5 and s["smapq_waiting_attempts_sum"] == 4
    assert s["smapq_deliveries_total"] == 2
    assert s["smapq_failures_total"] == 1
    assert s["smapq_refused_total"] == 2
    assert s["smapq_sessions_total"] == 11
    assert "# TYPE smapq_deliveries_total counter" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_http_endpoint(filled: Filled) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            program("smapq"),
            "-t",
            str(filled.spool.table),
            "report",
            "metrics",
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        body = b""
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                    body = r.read()
                    break
            except OSError:
                time.sleep(0.1)
        assert b'smapq_messages{state="bad"} 1' in body
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
        assert info.value.code == 404
        info.value.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_metrics_listen_is_checked(filled: Filled) -> None:
    result = filled.smapq("report", "metrics", "--listen", "nope", check=False)
    assert result.returncode == 64 and "HOST:PORT" in result.stderr


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


ALL_COMMANDS = _commands(cli)
MINE = [c for c in ALL_COMMANDS if c[0] in ("report", "queue", "import-spool")]


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help_text(path: tuple[str, ...]) -> None:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    assert (cmd.help or "").strip(), f"smapq {' '.join(path)} has no help text"
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden and param.name != "help":
            assert param.help, f"smapq {' '.join(path)} {param.opts[0]} has no help text"


@pytest.mark.parametrize("path", MINE, ids=" ".join)
def test_installed_help_runs(path: tuple[str, ...]) -> None:
    result = subprocess.run(
        [program("smapq"), *path, "--help"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("Usage: smapq ")
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
