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
