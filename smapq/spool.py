"""``smapq init``: create the spool (smap's jail), baddir and the migrated queue database.

Purpose: make the directories and the database with the owners and modes the table
asks for, and say what was done. Running it again changes only what is wrong
(idempotent). Two layouts:

  * one uid for both (the seed's ``smap, smapd: userid 5``): spool 0700 and database
    0600, owned by that uid and its group;
  * a uid of its own for smapd (``smap: userid smap``, ``smapd: userid smapd``,
    ``smap, smapd: groupid smapq``): the two share only the queue, through the group --
    spool 0770 and database 0660 owned by smap's uid and the shared group. SQLite
    gives the -wal/-shm files the database's mode, and both programs create files with
    the shared group as their only group, so either may create them.

baddir is smapd's alone (0700). ``layout()`` says which applies; ``check-config``
(``smapq.machine``) checks the same owners and modes on the running machine.

Security: runs as root (or as the only user of a demo spool). Everything is checked
before anything is created, so a bad table or an unwritable parent leaves nothing
half-made.
"""

from __future__ import annotations

import os
import stat

from smapq.config.settings import Config
from smapq.errors import SmapqError

DIR_MODE = 0o700
DB_MODE = 0o600
SHARED_DIR_MODE = 0o770
SHARED_DB_MODE = 0o660


class Plan:
    """One path to make: its kind, owner and mode."""

    __slots__ = ("gid", "kind", "mode", "path", "uid")

    def __init__(self, kind: str, path: str, uid: int, gid: int, mode: int) -> None:
        self.kind = kind
        self.path = path
        self.uid = uid
        self.gid = gid
        self.mode = mode


def _owner(uid: int | None, gid: int | None) -> tuple[int, int]:
    return (os.geteuid() if uid is None else uid, os.getegid() if gid is None else gid)


class Layout:
    """Who owns the queue and with which modes (see the module docstring)."""

    __slots__ = ("db_mode", "dir_mode", "duid", "gid", "shared", "suid")

    def __init__(self, config: Config) -> None:
        self.suid, sgid = _owner(config.smap.userid, config.smap.groupid)
        self.duid, dgid = _owner(config.smapd.userid, config.smapd.groupid)
        self.shared = self.suid != self.duid
        if self.shared and sgid != dgid:
            raise SmapqError(
                f"smap (uid {self.suid} gid {sgid}) and smapd (uid {self.duid} gid {dgid}) "
                "run as different users, so they must share a group for the queue: "
                "set 'smap, smapd: groupid NAME'"
            )
        self.gid = sgid
        self.dir_mode = SHARED_DIR_MODE if self.shared else DIR_MODE
        self.db_mode = SHARED_DB_MODE if self.shared else DB_MODE


def layout(config: Config) -> Layout:
    return Layout(config)


def plan(config: Config) -> list[Plan]:
    smap, smapd = config.smap, config.smapd
    lay = layout(config)
    duid, dgid = _owner(smapd.userid, smapd.groupid)
    plans = [Plan("directory", smap.directory, lay.suid, lay.gid, lay.dir_mode)]
    if smapd.directory != smap.directory:
        plans.append(Plan("directory", smapd.directory, duid, dgid, DIR_MODE))
    if smapd.baddir:
        plans.append(Plan("baddir", smapd.baddir, duid, dgid, DIR_MODE))
    if not smap.database_is_url:
        plans.append(Plan("database", smap.database_path, lay.suid, lay.gid, lay.db_mode))
    return plans


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check(plans: list[Plan]) -> None:
    """Refuse before creating anything: wrong kinds, unwritable parents, foreign owners."""
    root = os.geteuid() == 0
    for p in plans:
        if os.path.lexists(p.path):
            st = os.lstat(p.path)
            want_dir = p.kind != "database"
            if want_dir and not stat.S_ISDIR(st.st_mode):
                raise SmapqError(f"{p.path}: exists and is not a directory")
            if not want_dir and not stat.S_ISREG(st.st_mode):
                raise SmapqError(f"{p.path}: exists and is not a regular file")
        else:
            parent = _existing_ancestor(os.path.dirname(p.path))
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SmapqError(f"{p.path}: cannot create it, {parent} is not writable")
        if not root and (p.uid, p.gid) != (os.geteuid(), os.getegid()):
            raise SmapqError(
                f"{p.path}: must belong to uid {p.uid} gid {p.gid}; only root can do that"
            )


def _fix(p: Plan, done: list[str]) -> None:
    st = os.stat(p.path)
    if (st.st_uid, st.st_gid) != (p.uid, p.gid):
        os.chown(p.path, p.uid, p.gid)
        done.append(f"{p.path}: owner set to {p.uid}:{p.gid}")
    if stat.S_IMODE(st.st_mode) != p.mode:
        os.chmod(p.path, p.mode)
        done.append(f"{p.path}: mode set to {p.mode:04o}")


def _make_dir(p: Plan, done: list[str]) -> None:
    if os.path.isdir(p.path):
        _fix(p, done)
        return
    os.makedirs(os.path.dirname(p.path) or "/", mode=0o755, exist_ok=True)
    os.mkdir(p.path, p.mode)
    os.chown(p.path, p.uid, p.gid)
    os.chmod(p.path, p.mode)
    done.append(f"{p.path}: created {p.kind} ({p.mode:04o}, {p.uid}:{p.gid})")


def _make_database(p: Plan, done: list[str]) -> None:
    # Imported here: SQLAlchemy and alembic are not needed to make directories.
    from smapq.store import migrate  # noqa: PLC0415
    from smapq.store.engine import make_engine  # noqa: PLC0415

    existed = os.path.exists(p.path)
    if not existed:
        # Create it 0600 first so the data is never readable by others, even briefly.
        os.close(os.open(p.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, p.mode))
    engine = make_engine(p.path, create=True)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    if not existed:
        done.append(f"{p.path}: created database at schema {after}")
    elif before != after:
        done.append(f"{p.path}: upgraded schema {before or 'empty'} -> {after}")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(p.path + suffix):
            _fix(Plan(p.kind, p.path + suffix, p.uid, p.gid, p.mode), done)


def _migrate_server(url: str, done: list[str]) -> None:
    """A database on a server (PostgreSQL): its administrator made it; we migrate it."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    from smapq.store import migrate  # noqa: PLC0415
    from smapq.store.engine import make_engine  # noqa: PLC0415

    engine = make_engine(url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    shown = make_url(url).render_as_string(hide_password=True)
    if before is None:
        done.append(f"{shown}: created schema {after}")
    elif before != after:
        done.append(f"{shown}: upgraded schema {before} -> {after}")


def init(config: Config) -> list[str]:
    """Create or repair the spool; returns one line per change (empty: all was fine)."""
    plans = plan(config)
    check(plans)
    done: list[str] = []
    old = os.umask(0o077)
    try:
        for p in plans:
            if p.kind == "database":
                _make_database(p, done)
            else:
                _make_dir(p, done)
    finally:
        os.umask(old)
    if config.smap.database_is_url:
        _migrate_server(config.smap.database, done)
    return done
