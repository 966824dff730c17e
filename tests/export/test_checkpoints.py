"""The built checkpoints: each meets the accuracy bar of the recipe that trained it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import checkpoint, kinds, registry
from tests.conftest import TRAINED, TREE, built


@pytest.mark.parametrize("spec", TRAINED, ids=lambda s: s.name)
def test_built_checkpoint_meets_the_accuracy_bar_of_its_recipe(spec):
    path = built(TREE.checkpoint(spec.name))
    metrics = json.loads((path / checkpoint.META).read_text())["metrics"]
    recipe = spec.recipe(metrics["recipe"])
    gate = metrics.get("gate", "test_accuracy")  # the scene models' trainer names its figure (mAP@0.5, mIoU)
    assert metrics["min_accuracy"] == recipe.min_accuracy
    assert metrics[gate] >= recipe.min_accuracy
    if "train_scenes" in metrics:
        assert metrics["train_scenes"] == recipe.dataset_kwargs["train"]
    else:
        assert metrics["train_images"] == len(registry.resolve(spec.dataset)(**recipe.dataset_kwargs).train_labels)


def dry_run(*extra: str) -> list[str]:
    """The commands `make -n` lists for building every tested model in this tree, with `extra` make arguments."""
    import subprocess

    from tests.conftest import ROOT

    recipe = "quick" if TREE.root.resolve() == (ROOT / "build" / "quick").resolve() else "full"
    models = " ".join(name for name, spec in registry.entries().items() if registry.tested(spec))
    for model in models.split():
        built(TREE.archive(model))
    proc = subprocess.run(["make", "-n", *extra, f"RECIPE={recipe}", "models", f"SERVE_MODELS={models}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


# Every kind's module is its own (what image kinds share lives in handlers/images.py).
TESTED_KINDS = sorted({spec.kind for spec in registry.entries().values() if registry.tested(spec)})
# The steps that verify a model: export.verify, or its kind's exporter, which exports and verifies in one step.
EXPORTERS = sorted({kind.exporter for kind in kinds.KINDS.values() if kind.exporter})


def verified_model(line: str) -> str | None:
    """The model a command of the dry run verifies, if it verifies one."""
    words = line.split()
    if "export.verify" in words:
        return words[words.index("--model") + 1]
    if any(exporter in words for exporter in EXPORTERS):
        return Path(words[words.index("--out") + 1]).name
    return None


@pytest.mark.parametrize("kind", TESTED_KINDS)
def test_editing_a_kind_re_verifies_its_models_and_no_other(kind):
    """Verification depends on the files it reads, the kind's module (its `compare`) among them: make, told that
    the kind's module changed (-W), re-verifies that kind's tested models and nothing else, and re-exports none
    (a kind with an exporter of its own re-exports and re-verifies its models in one step, those alone)."""
    lines = dry_run("-W", str(kinds.module_file(kind)))
    verified = sorted(filter(None, map(verified_model, lines)))
    assert verified == sorted(name for name, spec in registry.entries().items()
                              if registry.tested(spec) and spec.kind == kind)
    assert not [line for line in lines if "export.export" in line or "models.train" in line]


def test_a_dry_run_lists_no_work_on_a_built_tree():
    """`make -n` tells the truth: with every tested model built (as `make test` has done before this tier), a dry
    run of the same build lists no training, export, verification or archiving. Registry stamps are brought up to
    date when make reads the Makefile, not by forced targets, which made every dry run list the whole chain."""
    steps = ("models.train", "export.export", "export.verify", "export.archive", *EXPORTERS)
    work = [line for line in dry_run() if any(step in line.split() for step in steps)]
    assert work == [], "\n".join(work)
