"""Scores on the shapes scenes, from maintained evaluators only: COCO mean average precision by torchmetrics'
MeanAveragePrecision on pycocotools (COCO's own evaluator), and mean IoU by torchmetrics' MulticlassJaccardIndex.
Training, the offline evaluation and the evaluation through the server all score here, so the figures compare. Each
scene kind names its scorer and headline figure in models/kinds.py (`metric`, `headline`); `num_classes` is what a
scorer takes whether it needs it or not."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from models.scenes import Scene


def detection(predictions: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], scenes: Sequence[Scene],
              num_classes: int | None = None) -> dict:
    """COCO mAP of `predictions` (per scene: boxes (k, 4) x0 y0 x1 y1 in the scene's pixels, scores (k,), labels
    (k,) 1-based) against the scenes' boxes: {"map_50": mAP at IoU 0.5, "map": mAP over IoU 0.5:0.95, "map_small",
    "map_medium", "map_large"} (COCO's area ranges; -1 where the split has no object of that size)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy", backend="pycocotools")
    preds, truth = [], []
    for (boxes, scores, labels), scene in zip(predictions, scenes, strict=True):
        preds.append({"boxes": torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4),
                      "scores": torch.as_tensor(np.asarray(scores, dtype=np.float32)).reshape(-1),
                      "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1)})
        truth.append({"boxes": torch.from_numpy(scene.boxes), "labels": torch.from_numpy(scene.labels)})
    metric.update(preds, truth)
    result = metric.compute()
    return {key: round(float(result[key]), 6) for key in ("map_50", "map", "map_small", "map_medium", "map_large")}


def segmentation(masks: Iterable[np.ndarray], scenes: Sequence[Scene], num_classes: int) -> dict:
    """Mean IoU of predicted class masks ((H, W) per scene) against the scenes' masks, over all pixels of the split:
    {"miou": the mean over the classes that occur in truth or prediction, the background included, "per_class": [IoU
    of class 0, 1, ...], 0 for a class that occurs in neither]}."""
    from torchmetrics.classification import MulticlassJaccardIndex

    mean, per_class = (MulticlassJaccardIndex(num_classes=num_classes, average=a) for a in ("macro", "none"))
    for mask, scene in zip(masks, scenes, strict=True):
        pair = torch.as_tensor(np.asarray(mask, dtype=np.int64))[None], torch.from_numpy(scene.mask.astype(np.int64))[None]
        mean.update(*pair)
        per_class.update(*pair)
    return {"miou": round(float(mean.compute()), 6), "per_class": [round(float(v), 6) for v in per_class.compute()]}
