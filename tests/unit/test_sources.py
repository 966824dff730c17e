"""What each build step depends on (models.registry sources/stamp) and what each archive carries."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from models import kinds
from models import registry
from models.sources import closure, relative
from tests.conftest import ROOT, SERVED


def sources(model: str, step: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "models.registry", "sources", model, step], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


@pytest.mark.parametrize("spec", [s for s in registry.REGISTRY.values() if s.train or s.pretrained],
                         ids=lambda s: s.name)
def test_a_checkpoint_depends_on_what_trains_it_and_nothing_served_or_measured(spec):
    files = sources(spec.name, "checkpoint")
    assert "models/train.py" in files and all((ROOT / f).is_file() for f in files)
    builder_module = spec.builder.partition(":")[0]
    if builder_module.startswith("models."):
        assert builder_module.replace(".", "/") + ".py" in files
    # not the registry module (its own entry counts, through its stamp), the payloads, handlers or benchmarks
    assert "models/registry.py" not in files and "models/samples.py" not in files
    assert not [f for f in files if f.startswith(("handlers/", "loadtest/", "export/", "serve_config/", "tests/"))]


def test_digits_checkpoint_does_not_depend_on_the_other_models_code():
    files = sources("digits", "checkpoint")
    assert "models/minilm.py" not in files and "models/text.py" not in files


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_an_archive_carries_its_handler_its_kind_and_exactly_the_modules_they_import(spec):
    files = sources(spec.name, "archive")
    assert spec.handler in files and str(kinds.module_file(spec.kind)) in files
    assert not {str(kinds.module_file(k)) for k in kinds.KINDS if k != spec.kind} & set(files), "another kind's code"
    assert not {"models/train.py", "models/shapes.py", "models/samples.py", "models/data.py", "models/minilm.py"} & set(files)
    assert not [f for f in files if f.startswith(("loadtest/", "export/", "serve_config/", "tests/"))]
    assert files == relative(closure([ROOT / spec.handler, ROOT / kinds.module_file(spec.kind)]))


def test_closure_follows_lazy_imports_and_packages(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("import os\n\ndef f():\n    from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("from pkg.c import thing\n")
    (tmp_path / "pkg" / "c.py").write_text("thing = 1\n")
    (tmp_path / "pkg" / "unused.py").write_text("")
    assert relative(closure(["pkg.a"], tmp_path), tmp_path) == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/c.py"]
    assert relative(closure(["pkg.a"], tmp_path, exclude=["pkg.b"]), tmp_path) == ["pkg/__init__.py", "pkg/a.py"]


def test_the_entry_stamp_changes_only_with_its_own_entry(tmp_path):
    digits, stamp = registry.get("digits"), tmp_path / "digits.json"
    assert registry.write_stamp(digits, str(stamp)) is True
    assert registry.write_stamp(digits, str(stamp)) is False, "an unchanged entry rewrote its stamp"
    changed = dataclasses.replace(digits, bench=dataclasses.replace(digits.bench, p99_ms=digits.bench.p99_ms + 1))
    assert registry.write_stamp(changed, str(stamp)) is True
