"""Build hook: the manual pages, generated from the command tree and the key table.

Everything else about the package is in pyproject.toml. The pages are rendered by
``cli/manpage.py`` (imported from this source tree, where ``cli`` is the package that
installs as ``smapq_cli``) into build/man and installed under share/man, so each
install documents exactly the commands and keywords it contains.
"""

from __future__ import annotations

import importlib
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join("build", "man")


def man_pages() -> list[tuple[str, list[str]]]:
    sys.path.insert(0, HERE)
    try:
        manpage = importlib.import_module("cli.manpage")
        written = manpage.write_pages(os.path.join(HERE, OUT))
    finally:
        sys.path.remove(HERE)
        for name in [m for m in sys.modules if m == "cli" or m.startswith(("cli.", "smapq"))]:
            del sys.modules[name]
    sections: dict[str, list[str]] = {}
    for path in written:
        rel = os.path.relpath(path, HERE)
        sections.setdefault(os.path.basename(os.path.dirname(rel)), []).append(rel)
    return [(f"share/man/{sec}", sorted(files)) for sec, files in sorted(sections.items())]


setup(data_files=man_pages())
