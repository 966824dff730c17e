"""The kind table (models/kinds.py) is the one place that knows the kinds: it sits below the registry and the
handlers, every kind's module defines what the table says it does, and no shipped code outside the kinds branches
on a kind's name or lists kinds of its own."""

from __future__ import annotations

import ast
import importlib
import re

import pytest

from models import kinds
from models.paths import ROOT

SHIPPED = ("models", "handlers", "export", "loadtest", "serve_config")
KIND_HOMES = {ROOT / "models" / "kinds.py", *(ROOT / "handlers" / "kinds").glob("*.py")}
NAMES = "|".join(re.escape(name) for name in kinds.KINDS)
# a comparison with a kind's name, or a literal collection of two or more kinds' names
BRANCH = re.compile(rf"""(==|!=|\bin|\bnot in)\s*[\(\[\{{]?\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)""")
PER_KIND = re.compile(rf"""[\(\[\{{][^\(\[\{{\)\]\}}]*["']({NAMES})["'][^\)\]\}}]*["']({NAMES})["']""")


def project_imports(path) -> set[str]:
    """The top-level project packages a module imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(SHIPPED)


def test_no_shipped_code_outside_the_kinds_branches_on_a_kind_or_lists_kinds():
    offenders = []
    for folder in SHIPPED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in KIND_HOMES:
                continue
            text = path.read_text()
            for number, line in enumerate(text.splitlines(), 1):
                if BRANCH.search(line) or PER_KIND.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "ask the kind (models/kinds.py, its module) instead:\n" + "\n".join(offenders)


def test_the_grep_finds_what_it_is_for():
    assert BRANCH.search('if spec.kind == "object-detector":') and BRANCH.search('kind in ("tensor",)')
    assert PER_KIND.search('HEADLINE = {"object-detector": "map_50", "image-segmenter": "miou"}')
    assert not BRANCH.search('kind="tensor",') and not PER_KIND.search('preset={"name": "tensor"}')


def test_the_kind_table_sits_below_the_registry_and_the_handlers():
    assert project_imports(ROOT / "models" / "kinds.py") == set(), "the table imports nothing of the project"
    assert "handlers" not in project_imports(ROOT / "models" / "registry.py"), "the registry reaches up to handlers"


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_every_kind_module_defines_what_the_table_says_it_does(name):
    kind, module = kinds.get(name), kinds.load(name)
    for attr in ("Settings", "build", "signature"):
        assert callable(getattr(module, attr, None)), f"{kind.module} has no {attr}"
    assert kinds.module_file(name).exists()
    tests_module = "tests.kinds." + kind.module.rpartition(".")[2]
    assert callable(getattr(importlib.import_module(tests_module), "Checks", None)), f"{tests_module} has no Checks"
    if kind.exporter is not None:  # the module make runs to export and verify the kind's models
        assert callable(getattr(importlib.import_module(kind.exporter), "main", None)), kind.exporter
    workload_module, _, workload = kind.bench.partition(":")
    assert hasattr(importlib.import_module(workload_module), workload), kind.bench
    if kind.metric is not None:
        assert kind.headline and callable(module.scored) and callable(module.parse), name
        metric_module, _, function = kind.metric.partition(":")
        assert callable(getattr(importlib.import_module(metric_module), function)), kind.metric
