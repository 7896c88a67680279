"""Prometheus metrics, the optional HTTP endpoint, and help text on every command."""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request

import click
import pytest

from smapq_cli.main import cli
from tests.conftest import program
from tests.report.conftest import Filled

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")


def _labels(text: str) -> list[tuple[str, str]]:
    """name="value" pairs; the whole text must be made of them (escapes checked)."""
    pairs = []
    pos = 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        assert match, f"bad label syntax at {text[pos:]!r}"
        pairs.append((match.group(1), match.group(2)))
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", text
            pos += 1
    return pairs


def parse_exposition(text: str) -> dict[str, float]:
    """sample name{labels} -> value, checked against the text format 0.0.4.

    Every family has one HELP then one TYPE line before its samples and appears once;
    names and label pairs are well formed; counters end in _total; a histogram's
    buckets rise with le, end with +Inf, equal _count there, and _sum is present.
    """
    samples: dict[str, float] = {}
    families: dict[str, str] = {}
    current = ""
    helped = ""
    hist: dict[str, list[tuple[float, float]]] = {}
    assert text.endswith("\n") and "\n\n" not in text
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert _NAME.fullmatch(name) and name not in families, line
            helped = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == helped and name not in families, f"TYPE without HELP: {line}"
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            families[name] = kind
            current = name
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.groups()
            kind = families[current]
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            assert any(name == current + sfx for sfx in suffixes), (current, line)
            pairs = _labels(labels or "")
            number = float(value)  # also accepts +Inf, NaN
            if kind == "counter":
                assert current.endswith("_total") and number >= 0, line
            if name.endswith("_bucket") and kind == "histogram":
                (le,) = [v for k, v in pairs if k == "le"]
                hist.setdefault(current, []).append((float(le), number))
            key = name + ("{" + labels + "}" if labels else "")
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = number
    for name, buckets in hist.items():
        les = [le for le, _ in buckets]
        counts = [n for _, n in buckets]
        assert les == sorted(les) and les[-1] == float("inf"), les
        assert counts == sorted(counts), f"{name}: buckets are not cumulative: {counts}"
        assert samples[f"{name}_count"] == counts[-1]
        assert f"{name}_sum" in samples
    return samples


def test_exposition_checker_catches_broken_text() -> None:
    good = (
        "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n"
        "# HELP h H.\n# TYPE h histogram\n"
        'h_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3\nh_count 2\n'
    )
    assert parse_exposition(good)["h_count"] == 2
    broken = [
        good.replace("# HELP x_total X.\n", ""),  # TYPE without HELP
        good.replace('h_bucket{le="1"} 1', 'h_bucket{le="1"} 3'),  # not cumulative
        good.replace('h_bucket{le="+Inf"} 2\n', ""),  # no +Inf bucket
        good.replace("h_count 2", "h_count 5"),  # +Inf != _count
        good.replace('{le="1"}', '{le="1}'),  # bad label quoting
        good.replace("x_total 1", "x_total one"),  # not a number
        good + "x_total 2\n",  # a sample outside its family
    ]
    for text in broken:
        with pytest.raises((AssertionError, ValueError, KeyError)):
            parse_exposition(text)


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
