"""Training writes a self-describing checkpoint; the real one meets the registry's accuracy bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import checkpoint, registry
from models.data import load_digits_split
from models.train import train
from tests.conftest import ROOT, TRAINED, built


def test_split_is_fixed_and_disjoint():
    a, b = load_digits_split(), load_digits_split()
    assert np.array_equal(a.test_labels, b.test_labels) and np.array_equal(a.test_images, b.test_images)
    assert len(a.train_labels) + len(a.test_labels) == 1797 and a.train_images.shape[1:] == (8, 8)


def test_short_run_writes_a_checkpoint_that_rebuilds_from_itself(tmp_path):
    spec = registry.get("digits")
    metrics = train(spec, tmp_path, epochs=1)
    state = torch.load(tmp_path / checkpoint.WEIGHTS, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((tmp_path / checkpoint.META).read_text())
    assert {"builder", "builder_kwargs", "preset", "labels", "metrics", "commit"} <= set(meta)
    assert meta["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    model, _ = checkpoint.load(tmp_path)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("spec", TRAINED, ids=lambda s: s.name)
def test_built_checkpoint_meets_the_accuracy_bar(spec):
    path = built(ROOT / "checkpoints" / spec.name)
    meta = json.loads((path / checkpoint.META).read_text())
    assert meta["metrics"]["test_accuracy"] >= spec.train.min_accuracy
