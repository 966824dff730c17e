"""The image-classifier kind: top-k labels per image. Requests are read and decoded as every image kind's are
(handlers/images.py: the three native forms and OIP, the same limits and errors). A classifier's OIP answer has
`label` BYTES, `index` INT64 and `score` FP32 outputs, each `[n, topk]`. Nothing here knows about TorchServe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from handlers import images, oip
from handlers.images import ImageConfig, ImagePipeline, Size

OUTPUTS = ("label", "index", "score")  # an OIP answer's outputs, in this order


@dataclass(frozen=True)
class ClassifierConfig(ImageConfig):
    """An image classifier's settings."""

    topk: int = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    """(B, C) logits -> (B, C) float32 probabilities (the largest logit subtracted first, as torch.softmax does)."""
    shifted = np.exp(logits.astype(np.float32) - logits.max(axis=1, keepdims=True).astype(np.float32))
    return shifted / shifted.sum(axis=1, keepdims=True)


def topk_predictions(probs: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """(B, C) probabilities -> per row, the top k as [{"label", "index", "score"}], best first (ties: the lower
    index first)."""
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, probs.shape[1])]
    scores = np.take_along_axis(probs, indices, axis=1)
    return [
        [{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s.tolist(), row_i.tolist())]
        for row_s, row_i in zip(scores, indices)
    ]


class ImageClassifier(ImagePipeline):
    """Top-k labels per image."""

    OUTPUTS = OUTPUTS

    def answers(self, outputs: list[np.ndarray], sizes: list[Size], options: Sequence[Any] = ()
                ) -> list[list[dict[str, Any]]]:
        return topk_predictions(softmax(outputs[0]), self.labels, self.config.topk)

    def infer_outputs(self, rows: list[list[dict[str, Any]]]) -> list[oip.Tensor]:
        shape = (len(rows), len(rows[0]))
        flat = [p for row in rows for p in row]
        return [oip.Tensor("label", "BYTES", shape, [p["label"] for p in flat]),
                oip.Tensor("index", "INT64", shape, [p["index"] for p in flat]),
                oip.Tensor("score", "FP32", shape, [p["score"] for p in flat])]


Settings = ClassifierConfig


def signature(export_manifest: dict, settings: ClassifierConfig) -> dict:
    """What an infer request takes and its answer gives, as OIP model metadata lists them (-1: any size)."""
    k = min(settings.topk, len(export_manifest["labels"]))
    return {"inputs": images.input_signature(export_manifest),
            "outputs": [{"name": name, "datatype": datatype, "shape": [-1, k]}
                        for name, datatype in zip(OUTPUTS, ("BYTES", "INT64", "FP32"), strict=True)]}


def build(model_dir, export_manifest: dict, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
          settings: ClassifierConfig, *, served_as: tuple[str, str], max_batch: int) -> ImagePipeline:
    """The kind's pipeline for an exported model."""
    return images.build(ImageClassifier, export_manifest, runner, settings, served_as=served_as, max_batch=max_batch)
