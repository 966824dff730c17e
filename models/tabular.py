"""A small MLP for tabular features: standardisation learnt from the training rows (a BatchNorm without
affine weights, its running statistics averaged over every training batch), then fully connected layers.
The scaling lives inside the model, so the exported graph takes the raw measurements a client has."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TabularMLP(nn.Module):
    """(batch, in_features) float32 -> (batch, num_classes) logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (32, 16), dropout: float = 0.1) -> None:
        super().__init__()
        self.scale = nn.BatchNorm1d(in_features, affine=False, momentum=None)  # momentum None: a plain average
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.scale(features))
