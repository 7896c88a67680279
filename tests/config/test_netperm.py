"""The netperm-table parser: FWTK syntax, first rule wins, errors name file:line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smapq.config.netperm import first_rule, parse_lines, read_rules, rules_for, table_path
from smapq.errors import ConfigError

SEED_TABLE = """\
# the sample from the seed
smap, smapd: userid 5
smap, smapd: directory /var/spool/smap
smapd: executable /usr/local/etc/smapd
smapd: sendmail /usr/lib/sendmail
smapd: baddir /var/spool/smap/bad
smap: timeout 3600
ftp-gw: timeout 3600
*: authserver 127.0.0.1 7777
"""


def rules(text: str) -> list:
    return list(parse_lines(text.splitlines(), "t"))


def test_seed_table_parses_line_numbers_and_programs() -> None:
    rs = rules(SEED_TABLE)
    assert [(r.line, r.programs, r.keyword, r.args) for r in rs][:2] == [
        (2, ("smap", "smapd"), "userid", ["5"]),
        (3, ("smap", "smapd"), "directory", ["/var/spool/smap"]),
    ]
    assert len(rs) == 8


def test_rules_for_program_include_star_and_skip_others() -> None:
    smap = rules_for(rules(SEED_TABLE), "smap")
    assert [r.keyword for r in smap] == ["userid", "directory", "timeout", "authserver"]
    assert all("ftp-gw" not in r.programs for r in smap)


def test_first_rule_wins() -> None:
    chosen = first_rule(rules("smap: timeout 10\nsmap: timeout 20\n"))
    assert chosen["timeout"].args == ["10"]
    assert chosen["timeout"].line == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("smap userid 5\n", "t:1: missing ':'"),
        ("\n\nsmap:\n", "t:3: missing keyword"),
        (": userid 5\n", "t:1: bad program list"),
        ("smap,,smapd: userid 5\n", "t:1: bad program list"),
    ],
)
def test_malformed_lines_name_file_and_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        rules(text)
    assert str(err.value).startswith(fragment)


def test_comments_and_blank_lines_are_skipped() -> None:
    assert rules("# smap: nothing\n\n   \n  # indented comment\n") == []


def test_table_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMAPQ_TABLE", raising=False)
    assert table_path(None) == "/usr/local/etc/netperm-table"
    monkeypatch.setenv("SMAPQ_TABLE", "/env/table")
    assert table_path(None) == "/env/table"
    assert table_path("/explicit") == "/explicit"


def test_group_or_world_writable_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "netperm-table"
    path.write_text("smap: timeout 10\n")
    for mode in (0o620, 0o602, 0o666):
        path.chmod(mode)
        with pytest.raises(ConfigError, match="writable by group or others"):
            read_rules(str(path))
    path.chmod(0o600)
    assert read_rules(str(path))[0].keyword == "timeout"


def test_missing_table_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as err:
        read_rules(str(tmp_path / "nope"))
    assert err.value.exit_code == 78


def test_table_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    path = tmp_path / "netperm-table"
    path.write_text("smap: timeout 10\n")
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        read_rules(str(path))


# --- property tests -------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_*", min_size=1, max_size=8)
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=12,
).filter(lambda w: ":" not in w and "#" not in w and w.strip() == w)


@given(
    st.lists(
        st.tuples(st.lists(names, min_size=1, max_size=3), words, st.lists(words, max_size=3)),
        max_size=12,
    )
)
def test_rendered_rules_parse_back(entries: list[tuple[list[str], str, list[str]]]) -> None:
    text = "".join(f"{', '.join(progs)}: {kw} {' '.join(args)}\n" for progs, kw, args in entries)
    parsed = rules(text)
    assert [(list(r.programs), r.keyword, r.args) for r in parsed] == [
        (progs, kw, args) for progs, kw, args in entries
    ]
    assert [r.line for r in parsed] == list(range(1, len(entries) + 1))


@given(st.text(max_size=200))
def test_parser_raises_only_config_errors(text: str) -> None:
    try:
        for rule in parse_lines(text.splitlines(), "t"):
            assert rule.keyword and not any(c.isspace() for c in rule.keyword)
    except ConfigError as exc:
        assert str(exc).startswith("t:")
