"""The installed manual pages document every command, option and keyword there is.

Expected content comes from the live click tree and the key table, never from a list
written here, so a command or keyword added later is checked (and, since the pages are
generated at build time, documented) without touching this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from smapq.config.keys import KEYS, SMAP, SMAPD, Key
from smapq_cli import manpage
from smapq_cli.deliver import smapd_cmd
from smapq_cli.main import cli
from tests.conftest import program

MAN = Path(sys.prefix) / "share" / "man"
PAGES = {
    "smapq": MAN / "man8" / "smapq.8",
    "smap": MAN / "man8" / "smap.8",
    "smapd": MAN / "man8" / "smapd.8",
    "netperm-table": MAN / "man5" / "netperm-table.5",
}


def source(name: str) -> str:
    """The installed page's roff source with option hyphens unescaped."""
    path = PAGES[name]
    assert path.exists(), f"{path} was not installed with the package"
    return path.read_text().replace("\\-", "-")


def options_of(cmd: click.Command) -> list[str]:
    return [o for p in cmd.params if isinstance(p, click.Option) for o in p.opts]


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_renders_without_warnings(name: str) -> None:
    proc = subprocess.run(
        ["man", "--warnings", "-l", str(PAGES[name])],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"},
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert name.upper() in proc.stdout.splitlines()[0]


def test_smapq_page_has_every_command_and_option() -> None:
    text = source("smapq")
    sections = re.split(r'^\.SS "', text, flags=re.MULTILINE)[1:]
    by_path = {s.split('"', 1)[0]: s for s in sections}
    for path in manpage.command_paths(cli):
        title = "smapq " + " ".join(path)
        assert title in by_path, f"{title} has no section"
        cmd: click.Command = cli
        for name in path:
            assert isinstance(cmd, click.Group)
            cmd = cmd.commands[name]
        for option in options_of(cmd):
            if option not in ("--help", "-h"):
                assert option in by_path[title], f"{title}: {option} is not documented"
    assert "_SMAPQ_COMPLETE=bash_source smapq" in text  # shell completion


def test_keyword_pages_have_every_keyword() -> None:
    pages = {name: source(name) for name in ("netperm-table", "smap", "smapd")}
    for key in KEYS:
        entry = f".BI {key.name} "
        assert entry in pages["netperm-table"], key.name
        assert (entry in pages["smap"]) == (SMAP in key.programs), key.name
        assert (entry in pages["smapd"]) == (SMAPD in key.programs), key.name


def test_smapd_page_has_its_options() -> None:
    text = source("smapd")
    assert text.count(".SH SYNOPSIS") == 1 and ".B smapd" in text
    for option in options_of(smapd_cmd):
        assert option in text, option


def test_a_new_keyword_is_documented_without_editing_the_generator() -> None:
    future = Key("zzfuture", (SMAPD,), "seconds", 7, "a keyword added later", lo=1, hi=9)
    page = manpage.netperm_page((*KEYS, future))
    assert '.BI zzfuture " seconds"' in page
    assert "a keyword added later. Read by smapd." in page and "Range: 1..9." in page


def test_roff_escaping() -> None:
    assert manpage.esc(".dot\n'quote\\back") == "\\&.dot\n\\&'quote\\eback"
    assert manpage.esc("a…b") == "a\\[u2026]b"
    assert manpage.opt("--once") == "\\-\\-once"


def test_shell_completion_works_as_documented() -> None:
    env = {**os.environ, "_SMAPQ_COMPLETE": "bash_source"}
    script = subprocess.run(
        [program("smapq")], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert script.returncode == 0 and "complete " in script.stdout
    env = {
        **os.environ,
        "_SMAPQ_COMPLETE": "bash_complete",
        "COMP_WORDS": "smapq report da",
        "COMP_CWORD": "2",
    }
    done = subprocess.run(
        [program("smapq")], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0 and "plain,daily" in done.stdout.splitlines()
