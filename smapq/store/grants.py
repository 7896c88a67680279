"""Least privilege on PostgreSQL: the receiver, deliverer and report group roles.

Purpose: ``smapq db grant`` creates three NOLOGIN group roles (``PREFIX_receiver``,
``PREFIX_deliverer``, ``PREFIX_report``) and sets their privileges on the queue's
tables to exactly what each audience runs, no more: every run first revokes
everything on those tables and sequences, then grants, so it is idempotent and
also takes back what an earlier version granted. Login roles are the DBA's:
``CREATE ROLE mx1 LOGIN IN ROLE smapq_receiver`` (docs/postgresql.md).

Security: the receiver runs on the MX hosts, facing the Internet; a compromised
receiver must not read the queue. It gets INSERT on messages, recipients and events
and USAGE on their id sequences (nextval), nothing else: no SELECT, so neither the
bodies nor ``INSERT ... RETURNING`` (which needs SELECT on the returned columns, so
the intake draws ids with nextval() first and inserts them). The foreign key check
of a recipient row runs as the table owner, so it needs no SELECT on messages.
The deliverer reads and changes the queue (claims, leases, outcomes, notices it
inserts, retention's deletes). The report role may only SELECT: ``report sql``
runs in a read-only transaction, but a session can switch that off
(``SET TRANSACTION READ WRITE``); privileges are the boundary, not the flag.
LISTEN and NOTIFY need no privilege. Every role may read ``alembic_version`` (the
schema revision, checked at start).

Standards: GRANT(7), REVOKE(7), CREATE ROLE(7); PostgreSQL 12 or later.

Diagnostics: the statements run in one transaction as whoever the URL names (a
role with CREATEROLE that owns the tables, normally the one that ran ``smapq
init``); a refusal is PostgreSQL's own message. ``statements()`` is also what
``smapq db grant --sql`` prints for a DBA to run with psql.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, text

TABLES = ("messages", "recipients", "events")
VERSION_TABLE = "alembic_version"
DEFAULT_PREFIX = "smapq"
_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}\Z")


@dataclass(frozen=True)
class Role:
    """One audience: the privileges it holds on each queue table."""

    suffix: str
    tables: tuple[tuple[str, str], ...]  # (privileges, table)
    sequences: bool  # USAGE on the id sequences (nextval)
    summary: str

    def name(self, prefix: str) -> str:
        return f"{prefix}_{self.suffix}"


_RW = "SELECT, INSERT, UPDATE, DELETE"

ROLES = (
    Role(
        "receiver",
        tuple(("INSERT", t) for t in TABLES),
        True,
        "INSERT on messages, recipients, events; nextval on their id sequences; "
        "reads nothing back",
    ),
    Role(
        "deliverer",
        tuple((_RW, t) for t in TABLES),
        True,
        "SELECT, INSERT, UPDATE, DELETE on messages, recipients, events; "
        "nextval on their id sequences",
    ),
    Role("report", tuple(("SELECT", t) for t in TABLES), False, "SELECT only"),
)


def check_prefix(prefix: str) -> str:
    """``prefix`` if it makes plain lower-case role names; ValueError otherwise."""
    if not _NAME.match(prefix):
        raise ValueError(
            f"role prefix {prefix!r}: use lower-case letters, digits and _ "
            "(at most 40, not starting with a digit)"
        )
    return prefix


def role_names(prefix: str = DEFAULT_PREFIX) -> list[str]:
    return [r.name(check_prefix(prefix)) for r in ROLES]


def _sequences_stmt(verb: str, role: str) -> str:
    # The sequence names come from the server: SERIAL and IDENTITY columns name them
    # alike by default, but a DBA may have renamed one.
    seqs = ", ".join(f"pg_get_serial_sequence('{t}', 'id')" for t in TABLES)
    fmt = f"{verb} ON SEQUENCE %s, %s, %s {'TO' if verb.startswith('GRANT') else 'FROM'} {role}"
    return f"DO $$BEGIN EXECUTE format('{fmt}', {seqs}); END$$"


def role_statements(role: Role, prefix: str) -> list[str]:
    """Create ``role`` if missing, then set its privileges to exactly its list."""
    name = role.name(prefix)
    every = ", ".join((*TABLES, VERSION_TABLE))
    out = [
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') "
        f"THEN CREATE ROLE {name} NOLOGIN; END IF; END$$",
        f"DO $$BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO {name}', "
        "current_database()); END$$",
        f"DO $$BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO {name}', "
        "current_schema()); END$$",
        f"REVOKE ALL ON {every} FROM {name}",
        _sequences_stmt("REVOKE ALL", name),
    ]
    out += [f"GRANT {privileges} ON {table} TO {name}" for privileges, table in role.tables]
    out.append(f"GRANT SELECT ON {VERSION_TABLE} TO {name}")
    if role.sequences:
        out.append(_sequences_stmt("GRANT USAGE", name))
    return out


def statements(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Every statement ``db grant`` runs, in order (each without a trailing ';')."""
    check_prefix(prefix)
    return [s for role in ROLES for s in role_statements(role, prefix)]


def existing_roles(conn: Connection, names: list[str]) -> set[str]:
    rows = conn.execute(
        text("SELECT rolname FROM pg_roles WHERE rolname = ANY(:names)"), {"names": names}
    )
    return {r[0] for r in rows}


def apply(conn: Connection, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Run ``statements(prefix)`` on ``conn`` (the caller commits); lines saying what
    was done, one per role."""
    names = role_names(prefix)
    before = existing_roles(conn, names)
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cur:
        for stmt in statements(prefix):
            # No parameters: psycopg then leaves the % of format() alone.
            cur.execute(stmt)
    lines = []
    for role in ROLES:
        name = role.name(prefix)
        how = "exists" if name in before else "created (NOLOGIN)"
        lines.append(f"role {name}: {how}; {role.summary}")
    return lines
