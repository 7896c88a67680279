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


def test_sqlite_receiver_never_imports_psycopg() -> None:
    # The PostgreSQL backend is imported by intake_open only for a PostgreSQL URL.
    loaded = _imported_after(["smapq.receive.main", "smapq.serve.worker"])
    assert not {m for m in loaded if m.startswith(("psycopg", "smapq.store.intake_postgresql"))}


def test_only_the_factory_imports_the_postgresql_backend() -> None:
    for path in sorted((ROOT / "smapq").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("smapq/store/intake_open.py", "smapq/store/intake_postgresql.py"):
            continue
        assert "smapq.store.intake_postgresql" not in _imports(path), rel


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
    assert "created database at schema 0002" in proc.stdout


# --- the import contract: which package may import which ---------------------------
# Each smapq package and the smapq (first-party) modules it may import, at run time or
# for types.  The receive/store seams stay where they are drawn: the intake core knows
# no transport and no backend, the transports know no SQL dialect beyond the lean
# intake backend, and nothing on the receiving side reaches the deliverer or reports.
LAYERS: dict[str, tuple[str, ...]] = {
    "smapq.smtp": ("smapq.smtp",),
    "smapq.config": ("smapq.config", "smapq.errors"),
    "smapq.intake": (
        "smapq.intake",
        "smapq.smtp",
        "smapq.errors",
        "smapq.store.ids",
        "smapq.config.policy",  # the compiled access policy: pure data, stdlib only
    ),
    "smapq.receive": (
        "smapq.receive",
        "smapq.intake",
        "smapq.smtp",
        "smapq.config",
        "smapq.errors",
        "smapq.store.intake_sqlite",
        "smapq.sandbox",
        "smapq.serve.main",  # smap -daemon, imported only for that spelling
    ),
    "smapq.serve": (
        "smapq.serve",
        "smapq.intake",
        "smapq.smtp",
        "smapq.config",
        "smapq.errors",
        "smapq.receive.jail",
        "smapq.receive.logsink",
        "smapq.store.intake_sqlite",
        "smapq.sandbox",
    ),
    # The store knows no caller (the intake backends implement the intake port and
    # answer with its replies): SQL flows out through named functions only.
    "smapq.store": (
        "smapq.store",
        "smapq.errors",
        "smapq_migrations",
        "smapq.intake.port",
        "smapq.smtp.replies",
    ),
}
# Modules of smapq.store that the receiving side may use: stdlib-only, no SQLAlchemy.
LEAN_STORE = (
    "smapq.store.intake_open",
    "smapq.store.intake_sqlite",
    "smapq.store.rendered",
    "smapq.store.writelock",
    "smapq.store.ids",
)
NEVER_FROM_INTAKE = ("asyncio", "sqlalchemy", "click", "sqlite3", "_sqlite3", "socket", "ssl")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (functions and TYPE_CHECKING too)."""
    import ast

    tree = ast.parse(path.read_text())
    found = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            for alias in node.names:  # "from a import b": a.b if that is a module, else a
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full) else base)
    return found


def _is_module(name: str) -> bool:
    if not name.startswith("smapq."):
        return False
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _allowed(module: str, allowed: tuple[str, ...]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_import_contract(package: str) -> None:
    allowed = (*LAYERS[package], *LEAN_STORE)
    broken = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        for module in sorted(_imports(path)):
            # "smapq" itself is the version string; every other module is checked.
            if module.startswith("smapq.") and not _allowed(module, allowed):
                broken.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not broken, "\n".join(broken)


def test_the_intake_core_does_no_io_and_knows_no_backend() -> None:
    for path in sorted((ROOT / "smapq/intake").rglob("*.py")):
        used = {m.split(".")[0] for m in _imports(path)}
        assert not used & set(NEVER_FROM_INTAKE), (path, used & set(NEVER_FROM_INTAKE))
        assert not {m for m in _imports(path) if m.startswith("smapq.store.intake_")}, path


def test_nothing_outside_the_transports_imports_them() -> None:
    for path in sorted((ROOT / "smapq").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("smapq/receive/", "smapq/serve/")):
            continue
        transports = {m for m in _imports(path) if m.startswith(("smapq.receive", "smapq.serve"))}
        assert not transports, (rel, transports)


def test_queries_never_branch_on_the_engine() -> None:
    """Dialect differences live in smapq.store.dialects, one module per engine."""
    for path in sorted((ROOT / "smapq/store/queries").rglob("*.py")):
        source = path.read_text()
        for needle in ("dialect.name", '"sqlite"', '"postgresql"', "PRAGMA"):
            if path.name == "intake.py" and needle in ('"sqlite"', '"postgresql"'):
                continue  # receiver_sql(dialect) names the compiler it renders for
            assert needle not in source, (path.relative_to(ROOT).as_posix(), needle)


# db grant and db copy (PostgreSQL administration) are store modules the CLI alone
# reaches: they import only the store and the errors, and no program imports them.
PG_ADMIN = ("smapq.store.grants", "smapq.store.copy")


def test_postgres_admin_modules_are_reached_only_from_the_cli() -> None:
    for name in PG_ADMIN:
        path = ROOT / (name.replace(".", "/") + ".py")
        mine = {m for m in _imports(path) if m.startswith("smapq.")}
        assert all(_allowed(m, ("smapq.store", "smapq.errors")) for m in mine), (name, mine)
    for path in sorted((ROOT / "smapq").rglob("*.py")):
        used = {m for m in _imports(path) if _allowed(m, PG_ADMIN)}
        assert not used, (path.relative_to(ROOT).as_posix(), used)
