"""The project's own source files a module needs: its import closure within this repository.

Read statically (ast, nothing imported or run), so any Python 3.11 can answer before the venv exists. It
follows every `import` and `from ... import`, at module level and inside functions alike (a lazy import
is still a dependency), and keeps only modules that are files of this repository; third-party and standard
library modules are left out. Two users:
- export.archive packs exactly the closure of a handler into its .mar;
- the Makefile makes a checkpoint depend on the closure of what trains it, not on every models/*.py.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable

from models.paths import ROOT


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file of module `name` in this repository (a module or a package's __init__), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, root: Path) -> set[str]:
    """Module names `path` imports, absolute; for `from a import b`, both `a` and `a.b` (b may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _with_packages(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs each enclosing package's __init__."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def closure(start: Iterable[Path | str], root: Path = ROOT, *, exclude: Iterable[str] = ()) -> list[Path]:
    """Every repository file the `start` files (paths) or modules (dotted names) import, directly or not,
    themselves included, sorted; the modules named in `exclude` are neither listed nor followed."""
    todo: list[Path] = []
    for item in start:
        if isinstance(item, Path) or str(item).endswith(".py"):
            todo.append(Path(item).resolve())
        else:
            todo += [f for n in _with_packages(str(item)) if (f := module_file(n, root)) is not None]
    skipped = {f for name in exclude if (f := module_file(name, root)) is not None}
    seen: set[Path] = set()
    todo = [path for path in todo if path not in skipped]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported(path, root):
            for package in _with_packages(name):
                found = module_file(package, root)
                if found is not None and found not in seen and found not in skipped:
                    todo.append(found)
    return sorted(seen)


def relative(paths: Iterable[Path], root: Path = ROOT) -> list[str]:
    return [str(p.resolve().relative_to(root.resolve())) for p in paths]
