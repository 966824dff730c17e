"""Training writes a self-describing checkpoint; the real one meets the registry's accuracy bar."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import checkpoint, registry
from models.data import load_digits_split
from models.registry import resolve
from models.train import train


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


def test_recipes_resolve_and_check_their_schedule():
    shapes, digits = registry.get("shapes"), registry.get("digits")
    assert shapes.recipe("quick") is shapes.train_quick and shapes.recipe() is shapes.train
    assert digits.recipe("quick") is digits.train, "no quick recipe: the full one"
    with pytest.raises(ValueError, match="epoch_sizes"):
        registry.TrainSpec(epochs=3, batch_size=8, lr=1e-3, weight_decay=0, seed=0, min_accuracy=0.5, epoch_sizes=(64,))
    with pytest.raises(ValueError, match="'full' or 'quick'"):
        shapes.recipe("fast")


def test_progressive_resizing_trains_at_each_epochs_size(tmp_path, monkeypatch, capsys):
    """Two epochs of the shapes architecture on a tiny split: the first at 32 px, the second at full size."""
    import dataclasses

    from models import data

    monkeypatch.setattr(data, "load_tiny_shapes", lambda **kw: data.load_shapes_split(train=32, test=16), raising=False)
    spec = dataclasses.replace(
        registry.get("shapes"), dataset="models.data:load_tiny_shapes",
        train=registry.TrainSpec(epochs=2, batch_size=16, lr=1e-3, weight_decay=0, seed=0, min_accuracy=0.0,
                                 augment=False, epoch_sizes=(32, 128)))
    metrics = train(spec, tmp_path)
    out = capsys.readouterr().out
    assert "epoch   1/2" in out and "at 32 px" in out and "test acc" in out.split("epoch   2/2")[1]
    assert metrics["recipe"] == "full" and metrics["train_images"] == 32
    model, _ = checkpoint.load(tmp_path)
    assert model(torch.zeros(1, 3, 128, 128)).shape == (1, 8)


@pytest.mark.parametrize("forged", [
    {"builder": "subprocess:run", "builder_kwargs": {"args": ["touch", "{marker}"]}},  # code from elsewhere
    {"builder": "torchvision.models:resnet18", "builder_kwargs": {"num_classes": 10}},  # another architecture
    {"model": "no-such-model"},
])
def test_a_checkpoint_rebuilds_only_the_architecture_its_entry_names(tmp_path, forged):
    """model.json comes with a checkpoint from elsewhere; its builder must be its registry entry's, or nothing runs."""
    spec = registry.get("digits")
    directory = checkpoint.save(resolve(spec.builder)(**spec.builder_kwargs), spec, tmp_path / "ckpt", metrics={}).parent
    marker = tmp_path / "ran"
    meta = json.loads((directory / checkpoint.META).read_text())
    text = json.dumps({**meta, **forged}).replace("{marker}", str(marker))
    (directory / checkpoint.META).write_text(text)
    with pytest.raises(checkpoint.CheckpointError, match="registry|registered"):
        checkpoint.load(directory)  # the entry its own "model" names
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(directory, spec)
    assert not marker.exists()
