"""Drop to smapd's userid/groupid, once, before any queue row is read.

Purpose: FWTK smapd set its user and group "immediately"; smapq does the same, in the
deliverer process itself, after the pre-drop work that needs root: reading the
netperm-table (root-owned, 0600), opening syslog, importing every module. From then
on the process that parses network-derived queue rows, and every sendmail it starts,
runs as that user with no supplementary groups.

Security: order is setgroups([]) -> setgid -> setuid, then a check that setuid(0) now
fails (FWTK never called setgroups, so root's groups survived). uid or gid 0 is
refused: leave userid unset to run as the invoking user. A non-root process cannot
switch users; if userid names someone else that is an error, not a silent no-op.
The queue database and its directory must be writable by that user (``smapq init``
makes them belong to smap's user; use the same userid for smap and smapd).

Diagnostics: ``PrivilegeError`` (exit 77) naming what failed.
"""

from __future__ import annotations

import os

from smapq.errors import PrivilegeError


def drop(userid: int | None, groupid: int | None) -> str:
    """Become ``userid``/``groupid``; returns a line for the log saying what happened."""
    euid = os.geteuid()
    if userid is None:
        if euid == 0:
            return "no smapd userid: running as root (set 'smapd: userid' to drop privileges)"
        return f"running as uid {euid} gid {os.getegid()}"
    if userid == 0 or groupid == 0:
        raise PrivilegeError("smapd: userid/groupid 0 refused; leave userid unset instead")
    if groupid is None:
        raise PrivilegeError(f"smapd: uid {userid} has no passwd entry: set groupid too")
    if euid != 0:
        if (userid, groupid) == (euid, os.getegid()):
            return f"running as uid {euid} gid {groupid}"
        raise PrivilegeError(
            f"smapd: userid {userid} groupid {groupid}: only root can switch to them "
            f"(running as uid {euid})"
        )
    try:
        os.setgroups([])
        os.setgid(groupid)
        os.setuid(userid)
    except OSError as exc:
        raise PrivilegeError(f"cannot drop to uid {userid} gid {groupid}: {exc}") from None
    try:
        os.setuid(0)
    except PermissionError:
        return f"dropped privileges to uid {userid} gid {groupid}, no supplementary groups"
    raise PrivilegeError("setuid(0) still works after dropping privileges")
