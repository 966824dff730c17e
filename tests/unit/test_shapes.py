"""The generated shapes dataset: reproducible from its seed, balanced, and too hard for a linear model."""

from __future__ import annotations

import numpy as np
import pytest

from models import registry
from models.shapes import CLASSES, SIZE, _rng, generate, render


def test_same_seed_same_images_in_any_order():
    images, labels = generate("train", 12, seed=3)
    again, labels_again = generate("train", 12, seed=3)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    # image i depends only on (seed, split, i): rendering it alone gives the same pixels
    assert np.array_equal(render(int(labels[9]), _rng(3, "train", 9)), images[9])


def test_seeds_and_splits_give_different_images():
    train, _ = generate("train", 4, seed=0)
    assert not np.array_equal(train, generate("train", 4, seed=1)[0])
    assert not np.array_equal(train, generate("test", 4, seed=0)[0])


def test_images_are_rgb_uint8_and_classes_balanced():
    images, labels = generate("test", 2 * len(CLASSES))
    assert images.shape == (2 * len(CLASSES), SIZE, SIZE, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [2] * len(CLASSES)
    assert images.std() > 20, "images have texture, not a flat colour"


def test_registry_labels_are_the_generator_classes():
    assert registry.SHAPES.labels == CLASSES


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::Warning")
def test_a_linear_model_on_the_pixels_fails():
    from sklearn.linear_model import LogisticRegression

    def features(images):  # 32x32 colour thumbnails, scaled to [0, 1]
        return images.reshape(len(images), 32, 4, 32, 4, 3).mean(axis=(2, 4)).reshape(len(images), -1) / 255.0

    train_x, train_y = generate("train", 800)
    test_x, test_y = generate("test", 400)
    model = LogisticRegression(max_iter=300).fit(features(train_x), train_y)
    accuracy = model.score(features(test_x), test_y)
    assert accuracy < 0.5, f"a linear model reached {accuracy:.2f}: the dataset is too easy"
