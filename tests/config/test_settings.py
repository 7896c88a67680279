"""The key table applied to a table: defaults, bounds, types, errors with file:line."""

from __future__ import annotations

import os
import pwd

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smapq.config import keys as K
from smapq.config.settings import loads
from smapq.errors import ConfigError


def test_defaults_are_the_fwtk_ones_where_fwtk_had_one() -> None:
    c = loads("")
    assert c.smapd.sendmail == "/usr/lib/sendmail"
    assert c.smapd.wakeup == 30
    assert c.smapd.maxchildren == 6
    assert c.smapd.baddir is None
    assert c.smap.userid is None
    assert c.smap.jail is True
    assert c.smapd.lease == 60
    assert c.smapd.retrycodes == frozenset({71, 74, 75})


def test_seed_table() -> None:
    c = loads(
        "smap, smapd: userid nobody\n"
        "smap, smapd: directory /var/spool/smap\n"
        "smapd: executable /usr/local/etc/smapd\n"
        "smapd: sendmail /usr/lib/sendmail\n"
        "smapd: baddir /var/spool/smap/bad\n"
        "smap: timeout 3600\n"
    )
    nobody = pwd.getpwnam("nobody")
    assert c.smap.userid == c.smapd.userid == nobody.pw_uid
    assert c.smap.groupid == nobody.pw_gid
    assert c.smap.timeout == 3600
    assert c.smapd.baddir == "/var/spool/smap/bad"
    assert c.smap.database_path == "/var/spool/smap/smapq.db"
    assert c.smap.database_in_jail == "/smapq.db"
    assert c.smap.origin["timeout"] == "<string>:6"
    assert c.smap.origin["maxbytes"] == "default"


def test_other_programs_lines_are_ignored_even_with_foreign_keywords() -> None:
    c = loads("ftp-gw: userid 0\nhttp-gw: bogus x y z\n*: authserver 127.0.0.1 7777\n")
    assert c.smap.userid is None


def test_star_rule_applies_to_both() -> None:
    c = loads("*: directory /srv/q\n")
    assert c.smap.directory == c.smapd.directory == "/srv/q"


def test_first_rule_wins_per_program() -> None:
    c = loads("smap: timeout 10\nsmap, smapd: timeout 99\n")
    assert c.smap.timeout == 10


def test_durations_and_sizes_take_suffixes() -> None:
    c = loads("smap: timeout 5m\nsmap: maxbytes 2M\nsmapd: maxqueuetime 5d\n")
    assert c.smap.timeout == 300
    assert c.smap.maxbytes == 2 * 1024 * 1024
    assert c.smapd.maxqueuetime == 5 * 86400


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("smap: frobnicate 1\n", "t:1: frobnicate: unknown keyword for smap"),
        ("smap: sendmail /x\n", "t:1: sendmail: not a keyword of smap"),
        ("smap: timeout\n", "t:1: timeout: takes exactly one argument, got 0"),
        ("smap: timeout 1 2\n", "t:1: timeout: takes exactly one argument, got 2"),
        ("smap: timeout soon\n", "t:1: timeout: 'soon' is not a duration"),
        ("smapd: maxchildren 0\n", "t:1: maxchildren: 0 is below the minimum 1"),
        ("smapd: maxchildren 9999\n", "t:1: maxchildren: 9999 is above the maximum 256"),
        ("smap: userid no-such-user-here\n", "t:1: userid: unknown user"),
        ("smap: groupid no-such-group-here\n", "t:1: groupid: unknown group"),
        ("smap: directory relative/dir\n", "t:1: directory: 'relative/dir' is not an absolute"),
        ("smap: jail maybe\n", "t:1: jail: 'maybe' is not on/off"),
        ("smapd: retrycodes 75,x\n", "t:1: retrycodes: 'x' is not an exit code"),
        ("\nsmap: userid 0\n", "t:2: userid: smap must not run as root"),
        ("smap: userid root\n", "t:1: userid: smap must not run as root"),
        ("smap: groupid 0\n", "t:1: groupid: smap must not run as root"),
    ],
)
def test_bad_lines_name_file_line_and_keyword(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(text, "t")
    assert str(err.value).startswith(message)
    assert err.value.exit_code == 78


def test_smapd_may_run_with_root_group_but_smap_may_not() -> None:
    assert loads("smapd: groupid 0\n").smapd.groupid == 0


def test_executable_is_accepted_and_ignored() -> None:
    assert loads("smapd: executable /usr/local/etc/smapd\n").smapd.executable


def test_warnings_for_split_queue_and_jail_off() -> None:
    c = loads("smap: directory /a\nsmapd: directory /b\nsmap: jail off\n")
    text = "\n".join(c.warnings())
    assert "smapd reads /b/smapq.db" in text
    assert "jail off" in text


def test_database_url_passes_through() -> None:
    c = loads("smap, smapd: database postgresql+psycopg://postgres@127.0.0.1/smapq\n")
    assert c.smap.database_is_url


# --- the key table itself ---------------------------------------------------------------


def test_key_table_defaults_are_within_bounds_and_documented() -> None:
    for key in K.KEYS:
        assert key.doc, key.name
        assert set(key.programs) <= set(K.PROGRAMS)
        if isinstance(key.default, int) and not isinstance(key.default, bool):
            assert key.lo is None or key.default >= key.lo, key.name
            assert key.hi is None or key.default <= key.hi, key.name


def test_every_fwtk_keyword_is_declared() -> None:
    smap = {k.name for k in K.keys_for("smap")}
    smapd = {k.name for k in K.keys_for("smapd")}
    assert {"userid", "groupid", "directory", "timeout", "maxbytes", "maxrecip"} <= smap
    assert {
        "userid",
        "groupid",
        "directory",
        "sendmail",
        "baddir",
        "wakeup",
        "maxchildren",
        "executable",
    } <= smapd


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d", "w"]))
def test_seconds_round_trip(n: int, suffix: str) -> None:
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[suffix]
    assert K.parse_seconds(f"{n}{suffix}") == n * scale


@given(st.integers(min_value=1, max_value=1000))
def test_int_keys_inside_bounds_parse_outside_refuse(n: int) -> None:
    ok = 1 <= n <= 256
    try:
        c = loads(f"smapd: maxchildren {n}\n")
    except ConfigError:
        assert not ok
    else:
        assert ok and c.smapd.maxchildren == n


# --- sender notices (smapd: bounce, delaywarning) -----------------------------------


def test_bounce_is_off_and_delaywarning_zero_by_default() -> None:
    c = loads("")
    assert c.smapd.bounce is False and c.smapd.delaywarning == 0
    assert not [w for w in c.warnings() if "delaywarning" in w]


def test_smapd_names_the_host_like_smap_unless_told_otherwise() -> None:
    c = loads("smap: hostname mx.example.org\n", "/t")
    assert c.smapd.host == "mx.example.org"
    assert c.smapd.origin["hostname"] == "/t:1 (smap's)"
    c = loads("smap: hostname mx.example.org\nsmapd: hostname out.example.org\n")
    assert (c.smap.hostname, c.smapd.host) == ("mx.example.org", "out.example.org")
    assert loads("").smapd.host == os.uname().nodename


def test_delaywarning_that_can_never_fire_is_warned_about() -> None:
    off = loads("smapd: delaywarning 4h\n").warnings()
    assert "smapd: delaywarning is set but bounce is off: no warning is sent" in off
    late = loads("smapd: bounce on\nsmapd: delaywarning 5d\n").warnings()
    assert any("not below maxqueuetime" in w for w in late)
    fine = loads("smapd: bounce on\nsmapd: delaywarning 4h\n").warnings()
    assert not [w for w in fine if "delaywarning" in w]
