"""A model with two inputs of different dtypes and two outputs, for serving any model as named tensors: dense
features FP32 [n, 8] and token ids INT64 [n, L] with L dynamic in, class scores FP32 [n, 3] and the position of
the strongest token INT64 [n] out. Its checkpoint is brought (the README's bring-your-own example), not trained."""

from __future__ import annotations

import torch
from torch import nn


class PairScorer(nn.Module):
    def __init__(self, features: int = 8, vocab: int = 100, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.dense = nn.Linear(features, width)
        self.head = nn.Linear(width, classes)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = torch.tanh(self.dense(features)).unsqueeze(1) * self.embed(tokens)  # (n, L, width)
        scores = self.head(mixed.mean(dim=1))  # a mean over L: padding a row's tokens would change it
        strongest = mixed.sum(dim=-1).argmax(dim=1)
        return scores, strongest
