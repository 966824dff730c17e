"""The built checkpoints: each meets the accuracy bar of the recipe that trained it."""

from __future__ import annotations

import json

import pytest

from models import checkpoint, registry
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
    models = " ".join(name for name, spec in registry.REGISTRY.items() if registry.tested(spec))
    for model in models.split():
        built(TREE.archive(model))
    proc = subprocess.run(["make", "-n", *extra, f"RECIPE={recipe}", "models", f"SERVE_MODELS={models}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


# Every kind's module is its own (what image kinds share lives in handlers/images.py).
TESTED_KINDS = sorted({spec.kind for spec in registry.REGISTRY.values() if registry.tested(spec)})


@pytest.mark.parametrize("kind", TESTED_KINDS)
def test_editing_a_kind_re_verifies_its_models_and_no_other(kind):
    """Verification depends on the files it reads, the kind's module (its `compare`) among them: make, told that
    the kind's module changed (-W), re-verifies that kind's tested models and nothing else, and re-exports none."""
    from models import kinds

    lines = dry_run("-W", str(kinds.module_file(kind)))
    verified = sorted(line.split("--model ")[1].split()[0] for line in lines if "export.verify" in line)
    assert verified == sorted(name for name, spec in registry.REGISTRY.items()
                              if registry.tested(spec) and spec.kind == kind)
    assert not [line for line in lines if "export.export" in line or "models.train" in line]


def test_a_dry_run_lists_no_work_on_a_built_tree():
    """`make -n` tells the truth: with every tested model built (as `make test` has done before this tier), a dry
    run of the same build lists no training, export, verification or archiving. Registry stamps are brought up to
    date when make reads the Makefile, not by forced targets, which made every dry run list the whole chain."""
    work = [line for line in dry_run()
            if any(step in line for step in ("models.train", "export.export", "export.verify", "export.archive"))]
    assert work == [], "\n".join(work)
