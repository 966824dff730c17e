"""The generated scenes (models/scenes.py): reproducible from the seed, and their targets say what the pixels show."""

from __future__ import annotations

import numpy as np
import pytest

from models.scenes import MAX_OBJECTS, MIN_PIXELS, SIZE, cached, generate, render, scene_rng
from models.shapes import CLASSES


@pytest.fixture(scope="module")
def scenes():
    return generate("train", 120, seed=5)


def test_same_seed_same_scene_in_any_order(scenes):
    again = render(scene_rng(5, "train", 37))
    assert np.array_equal(again.image, scenes[37].image) and np.array_equal(again.mask, scenes[37].mask)
    assert np.array_equal(again.boxes, scenes[37].boxes) and np.array_equal(again.labels, scenes[37].labels)
    assert not np.array_equal(render(scene_rng(5, "test", 37)).image, scenes[37].image)
    assert not np.array_equal(render(scene_rng(6, "train", 37)).image, scenes[37].image)


def test_each_box_is_the_extent_of_its_objects_pixels_and_the_mask_has_nothing_else(scenes):
    for i, scene in enumerate(scenes):
        assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.labels) <= MAX_OBJECTS and len(scene.boxes) == len(scene.labels), i
        assert set(scene.labels.tolist()) <= set(range(1, len(CLASSES) + 1))
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for (x0, y0, x1, y1), label in zip(scene.boxes.astype(int), scene.labels):
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE, (i, x0, y0, x1, y1)
            inside = scene.mask[y0:y1, x0:x1] == label
            assert inside.sum() >= MIN_PIXELS, i
            # the box is tight: its outer rows and columns hold pixels of its class
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any(), i
            covered[y0:y1, x0:x1] |= inside
        assert not ((scene.mask > 0) & ~covered).any(), f"scene {i}: labelled pixels outside every box of their class"


def test_scenes_mix_sizes_counts_classes_and_overlaps(scenes):
    sides = np.concatenate([np.maximum(s.boxes[:, 2] - s.boxes[:, 0], s.boxes[:, 3] - s.boxes[:, 1]) for s in scenes])
    assert sides.min() <= 14 and sides.max() >= 90, (sides.min(), sides.max())
    assert {len(s.labels) for s in scenes} >= {1, MAX_OBJECTS - 1}
    assert set(np.concatenate([s.labels for s in scenes]).tolist()) == set(range(1, len(CLASSES) + 1))

    def overlapping(boxes):
        return any(max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3])
                   for j, a in enumerate(boxes) for b in boxes[j + 1:])

    assert sum(overlapping(s.boxes.tolist()) for s in scenes) >= 10
    assert np.mean([s.image.std() for s in scenes]) > 20, "textured backgrounds, not flat colour"


def test_the_cache_gives_back_what_was_generated(tmp_path):
    first = cached("samples", 6, seed=2, cache=tmp_path)
    again = cached("samples", 6, seed=2, cache=tmp_path)
    fresh = generate("samples", 6, seed=2)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for a, b, c in zip(first, again, fresh):
        for field in ("image", "boxes", "labels", "mask"):
            assert np.array_equal(getattr(a, field), getattr(c, field)) and np.array_equal(getattr(b, field), getattr(c, field))
