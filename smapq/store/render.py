"""Write or check ``smapq/store/rendered.py``: the receiver's SQL, from the one schema.

Usage: ``python -m smapq.store.render > smapq/store/rendered.py`` writes the file's
text to stdout; ``python -m smapq.store.render --check`` exits 1 (naming the file)
when the installed ``rendered.py`` differs from what the statements in
``smapq.store.queries.intake`` render to today.

Purpose: the lean inetd receiver cannot import SQLAlchemy, so it runs SQL text; this
command keeps that text generated, never hand-edited.
"""

from __future__ import annotations

import sys
from pathlib import Path

from smapq.store.queries.intake import receiver_sql

_WIDTH = 84

_HEADER = '''"""The receiver's SQL, rendered from ``smapq.store.queries`` for stdlib sqlite3.

Purpose: the inetd receiver runs on every SMTP connection and cannot import
SQLAlchemy (270+ ms), yet all SQL is defined once, from the one schema.  These strings
are ``queries.receiver_sql()`` (SQLite dialect, named parameters), written by
``python -m smapq.store.render > smapq/store/rendered.py``; ``--check`` and
tests/receive/test_receive_rendered.py fail when the two differ.  Do not edit by hand.

Also here: the connection pragmas the receiver sets, the same as
``smapq.store.dialects.sqlite`` sets for SQLAlchemy writers (the test checks that too).

Lean: constants only, stdlib-free.
"""

from __future__ import annotations
'''

_FOOTER = """
# synchronous=FULL: a COMMIT is on disk before the receiver says 250 (in WAL mode,
# NORMAL can lose a commit on power loss).  journal_mode=WAL is persistent in the file:
# ``smapq init`` (smapq.store.engine) set it, so the receiver does not pay a schema read
# before its banner to assert it again.  temp_store: the jail has no /tmp.
PRAGMAS = (
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA temp_store = MEMORY",
)
BUSY_TIMEOUT_MS = 5000
"""


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _pieces(sql: str) -> list[str]:
    """``sql`` cut after spaces into pieces of at most ``_WIDTH`` characters."""
    pieces: list[str] = []
    current = ""
    for word in sql.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and len(_literal(candidate + " ")) > _WIDTH:
            pieces.append(current + " ")
            current = word
        else:
            current = candidate
    pieces.append(current)
    return pieces


def render() -> str:
    """The text ``rendered.py`` must hold."""
    parts = [_HEADER]
    for name, sql in receiver_sql("sqlite").items():
        body = "\n".join(f"    {_literal(p)}" for p in _pieces(sql))
        parts.append(f"\n{name} = (\n{body}\n)\n")
    parts.append(_FOOTER)
    return "".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        from smapq.store import rendered  # noqa: PLC0415

        path = Path(rendered.__file__)
        if path.read_text(encoding="utf-8") != text:
            print(
                f"{path}: stale; run python -m smapq.store.render > smapq/store/rendered.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if argv[1:]:
        print("usage: python -m smapq.store.render [--check]", file=sys.stderr)
        return 64
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
