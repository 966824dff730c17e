"""Datasets, loaded offline. `digits`: the real handwritten digits that scikit-learn ships."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """A fixed train/test split of raw images (H, W) in [0, 1] with integer labels."""

    train_images: np.ndarray  # (N, H, W) float32
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray  # (M, H, W) float32
    test_labels: np.ndarray  # (M,) int64


def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 1,797 8x8 digits (values 0..16, white ink on black) scaled to [0, 1],
    split by a stratified shuffle with a fixed seed so every run holds out the same images."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)  # (1797, 8, 8)
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return Split(train_x, train_y, test_x, test_y)
