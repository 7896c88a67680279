"""Finding 7 (last item) of the hardening review: the table must not be replaceable by
anyone but root or the invoking user -- not through a world-writable directory on its
path, nor through a symlink someone else planted in one. Checked by the parser itself
(so smap, smapd and every smapq command refuse it) and through the installed programs."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from smapq.config.netperm import read_rules
from smapq.errors import EX_CONFIG, ConfigError
from tests.conftest import program, root_only, write_table

TABLE = "smap: timeout 10\n"


def table_in(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    return write_table(directory / "netperm-table", TABLE)


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    path = table_in(tmp_path / "open")
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(
        ConfigError, match=r"open: directory on the table's path is writable by others"
    ):
        read_rules(str(path))


def test_world_writable_directory_higher_up_is_refused(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    path = table_in(tmp_path / "open" / "etc")
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        read_rules(str(path))


def test_sticky_world_writable_directory_protects_our_own_entry(tmp_path: Path) -> None:
    path = table_in(tmp_path / "tmp")
    (tmp_path / "tmp").chmod(0o1777)
    assert read_rules(str(path))[0].keyword == "timeout"


def test_world_writable_symlink_target_directory_is_refused(tmp_path: Path) -> None:
    table_in(tmp_path / "open")
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "safe").mkdir()
    (tmp_path / "safe" / "link").symlink_to(tmp_path / "open")
    with pytest.raises(ConfigError, match="writable by others"):
        read_rules(str(tmp_path / "safe" / "link" / "netperm-table"))


def test_relative_symlinks_and_dotdot_are_followed_like_the_kernel(tmp_path: Path) -> None:
    table_in(tmp_path / "etc")
    (tmp_path / "etc" / "sub").mkdir()
    (tmp_path / "etc" / "sub" / "up").symlink_to("..")
    assert read_rules(str(tmp_path / "etc" / "sub" / "up" / "netperm-table"))
    assert read_rules(str(tmp_path / "etc" / "sub" / ".." / "netperm-table"))


def test_symlink_loop_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(ConfigError, match="too many symbolic links"):
        read_rules(str(tmp_path / "a"))


@root_only
@pytest.mark.privileged
def test_symlink_planted_by_another_user_in_a_sticky_directory_is_refused(
    tmp_path: Path,
) -> None:
    good = table_in(tmp_path / "etc")
    sticky = tmp_path / "tmp"
    sticky.mkdir(mode=0o1777)
    sticky.chmod(0o1777)
    link = sticky / "netperm-table"
    link.symlink_to(good)
    os.lchown(link, 65534, 65534)  # nobody planted it; nobody can repoint it
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        read_rules(str(link))
    os.lchown(link, 0, 0)  # root's own link in a sticky directory cannot be replaced
    assert read_rules(str(link))


@root_only
@pytest.mark.privileged
def test_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = table_in(tmp_path / "theirs")
    os.chown(tmp_path / "theirs", 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        read_rules(str(path))


def _world_writable_table(tmp_path: Path) -> Path:
    (tmp_path / "open").mkdir()
    path = write_table(
        tmp_path / "open" / "netperm-table",
        f"smap, smapd: directory {tmp_path}/spool\nsmap: jail off\n",
    )
    (tmp_path / "open").chmod(0o777)
    return path


def test_smapq_refuses_it_in_one_line(tmp_path: Path) -> None:
    path = _world_writable_table(tmp_path)
    for args in (["check-config"], ["init"], ["deliver", "--once"]):
        proc = subprocess.run(
            [program("smapq"), "-t", str(path), *args], capture_output=True, text=True, check=False
        )
        assert proc.returncode == EX_CONFIG, proc.stderr
        assert proc.stderr.count("\n") == 1 and "writable by others" in proc.stderr
    assert not (tmp_path / "spool").exists()


def test_smap_refuses_it_with_421(tmp_path: Path) -> None:
    path = _world_writable_table(tmp_path)
    a, b = socket.socketpair()
    with a, b:
        proc = subprocess.run(
            [program("smap"), "-t", str(path)],
            stdin=b.fileno(), stdout=b.fileno(), stderr=subprocess.PIPE, timeout=60, check=False,
        )  # fmt: skip
        b.close()
        reply = a.recv(4096)
    assert proc.returncode == EX_CONFIG
    assert reply.startswith(b"421 ")
    assert b"writable by others" in proc.stderr
