"""The command line as an operator meets it: -t anywhere, refused mode mixes, help texts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import pytest

from smapq_cli.main import cli
from tests.conftest import Spool, make_spool, program


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for name, cmd in sorted(group.commands.items()):
        path = (*prefix, name)
        out += _leaves(cmd, path) if isinstance(cmd, click.Group) else [path]
    return out


def _every_command(group: click.Group) -> list[tuple[str, ...]]:
    """Every group and command below the root, from the click tree itself."""
    out: list[tuple[str, ...]] = []
    for name, cmd in sorted(group.commands.items()):
        out.append((name,))
        if isinstance(cmd, click.Group):
            out += [(name, *rest) for rest in _every_command(cmd)]
    return out


def _command(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = cli
    for name in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[name]
    return cmd


def smapq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [program("smapq"), *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("path", _every_command(cli), ids=" ".join)
def test_every_command_and_group_takes_the_table_option(path: tuple[str, ...]) -> None:
    opts = [o for p in _command(path).params for o in getattr(p, "opts", [])]
    assert "-t" in opts and "--table" in opts, f"smapq {' '.join(path)} has no -t/--table"


def test_a_command_added_later_gets_the_table_option_too() -> None:
    probe = click.Command("probe", callback=lambda: None, help="x")
    group = click.Group("later", help="y")
    group.add_command(probe)
    cli.add_command(group)
    try:
        assert "--table" in [o for p in probe.params for o in getattr(p, "opts", [])]
    finally:
        cli.commands.pop("later")


def test_table_after_the_command_is_used(open_dir: Path, tmp_path: Path) -> None:
    # A spool check-config finds nothing wrong with, as root too (a user for smap, a
    # sendmail that exists): its exit status then says only whether -t was taken.
    user = "nobody" if os.geteuid() == 0 else None
    spool = make_spool(open_dir, "smapd: sendmail /bin/true\n", user=user)
    table = str(spool.table)
    # After the command, after a subgroup, and between group and command.
    for args in (
        ["check-config", "-t", table],
        ["db", "current", "--table", table],
        ["db", "-t", table, "current"],
        ["report", "summary", f"--table={table}"],
        ["queue", "list", "-t", table],
        ["queue", "-t", table, "list"],
    ):
        proc = smapq(*args)
        assert proc.returncode == 0, (args, proc.stderr)
    # The innermost -t wins, and the table named is the one read.
    assert smapq("-t", str(tmp_path / "nope"), "check-config", "-t", table).returncode == 0
    wrong = smapq("-t", table, "check-config", "-t", str(tmp_path / "nope"))
    assert wrong.returncode == 78 and f"{tmp_path / 'nope'}: no such file" in wrong.stderr


def test_deliver_once_and_daemon_together_is_a_usage_error(spool: Spool) -> None:
    for args in (["--once", "--daemon"], ["--daemon", "--once"], []):
        proc = smapq("-t", str(spool.table), "deliver", *args)
        assert proc.returncode == 64, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    both = smapq("-t", str(spool.table), "deliver", "--once", "--daemon")
    assert "--once and --daemon exclude each other" in both.stderr


def test_smapd_help_names_smapd() -> None:
    proc = subprocess.run(
        [program("smapd"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: smapd [OPTIONS]\n"), proc.stdout
    assert "smapq deliver --daemon" in proc.stdout and "-t, --table PATH" in proc.stdout
    refused = subprocess.run(
        [program("smapd"), "--once"], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 64 and refused.stderr.startswith("smapd: ")


def test_smapd_reads_the_table_it_is_given(tmp_path: Path) -> None:
    proc = subprocess.run(
        [program("smapd"), "-t", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 78 and f"{tmp_path / 'absent'}: no such file" in proc.stderr


def test_maildrop_help_exits_zero() -> None:
    proc = subprocess.run(
        [program("smapq-maildrop"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        input="",
    )
    assert proc.returncode == 0 and proc.stdout.startswith("usage: smapq-maildrop ")
    assert proc.stderr == ""
    bad = subprocess.run(
        [program("smapq-maildrop")], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 64


def test_license_is_an_spdx_string() -> None:
    # A table made setuptools warn on every install; a string needs setuptools >= 77.
    import tomllib

    meta = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "BSD-3-Clause"
    assert "setuptools>=77" in meta["build-system"]["requires"]
