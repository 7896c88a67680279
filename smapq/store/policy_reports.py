"""The SQL of ``smapq report refused --by rule``: refusals grouped by what refused them.

Purpose: the receiver writes every refusal as a ``reject`` event whose detail is its
reason; an access-policy refusal's detail names the rule (``policy FILE:LINE noto``,
``policy FILE:LINE domains: relay access denied``: smapq.intake.policy), constant for
one rule, so grouping by (detail, code) groups by rule.  One statement ranks the
groups; one more per winner reads its latest sample address.

Security: read-only; the caller's connection comes from a ``readonly=True`` engine.
Standards: SQLAlchemy Core on the one MetaData, the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, distinct, func, select

from smapq.store.schema import events


def refused_by_reason(
    conn: Connection, since: float | None, until: float | None, top: int
) -> list[Sequence[Any]]:
    """(detail, code, refusals, clients, last seen, latest address), most first."""
    e = events.c
    n = func.count().label("n")
    conds = [e.kind == "reject"]
    if since is not None:
        conds.append(e.at >= since)
    if until is not None:
        conds.append(e.at < until)
    ranked = list(
        conn.execute(
            select(e.detail, e.code, n, func.count(distinct(e.client_addr)), func.max(e.at))
            .where(*conds)
            .group_by(e.detail, e.code)
            .order_by(n.desc(), e.detail, e.code)
            .limit(top)
        )
    )
    out: list[Sequence[Any]] = []
    for detail, code, count, clients, last in ranked:
        sample = (
            select(e.address)
            .where(e.kind == "reject", e.at == last)
            .where(e.detail.is_(None) if detail is None else e.detail == detail)
            .where(e.code.is_(None) if code is None else e.code == code)
            .limit(1)
        )
        address = conn.execute(sample).scalar_one_or_none()
        out.append((detail, code, count, clients, last, address))
    return out
