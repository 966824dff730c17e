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
    assert metrics["min_accuracy"] == recipe.min_accuracy
    assert metrics["test_accuracy"] >= recipe.min_accuracy
    assert metrics["train_images"] == len(registry.resolve(spec.dataset)(**recipe.dataset_kwargs).train_labels)
