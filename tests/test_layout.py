"""The layout keeps its promises: packaging lists every package, the engine never
imports click, the receiver never imports SQLAlchemy or the deliverer."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import program

ROOT = Path(__file__).resolve().parent.parent


def _packages_in_tree() -> set[str]:
    found = set()
    for top, name in (
        ("smapq", "smapq"),
        ("cli", "smapq_cli"),
        ("migrations", "smapq_migrations"),
    ):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    return found


def test_pyproject_lists_every_package() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(meta["tool"]["setuptools"]["packages"]) == _packages_in_tree()


def _engine_modules() -> list[str]:
    mods = []
    for path in sorted((ROOT / "smapq").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] == "__main__":
            continue
        mods.append(".".join(parts))
    return mods


def _imported_after(modules: list[str]) -> set[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    )
    return set(out.stdout.split())


def test_engine_never_imports_click() -> None:
    loaded = _imported_after(_engine_modules())
    assert "click" not in loaded


LEAN = ["smapq.config.settings", "smapq.store.ids", "smapq.sandbox"]


@pytest.mark.parametrize("extra", [[], ["smapq.receive.main", "smapq.store.rendered"]])
def test_receiver_path_stays_lean(extra: list[str]) -> None:
    mods = LEAN + [m for m in extra if (ROOT / (m.replace(".", "/") + ".py")).exists()]
    # Subtract what the interpreter loads anyway (an editable install's finder loads re).
    loaded = _imported_after(mods) - _imported_after([])
    heavy = {
        "sqlalchemy",
        "alembic",
        "click",
        "re",
        "dataclasses",
        "enum",
        "typing",
        "email",
        "logging",
        "smapq.deliver",
        "smapq.report",
    }
    assert not heavy & loaded, sorted(heavy & loaded)


def test_console_scripts_work_from_any_directory(tmp_path: Path) -> None:
    for name in ("smapq", "smapd"):
        proc = subprocess.run(
            [program(name), "--help"], capture_output=True, text=True, cwd=tmp_path, check=False
        )
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout


def test_migrations_are_found_outside_the_source_tree(tmp_path: Path) -> None:
    table = tmp_path / "t"
    table.write_text(f"*: directory {tmp_path}/q\nsmap: jail off\n")
    table.chmod(0o600)
    proc = subprocess.run(
        [program("smapq"), "-t", str(table), "init"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "created database at schema 0001" in proc.stdout
