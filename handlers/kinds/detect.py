"""The object-detector kind: images in, boxes with labels and scores out. Pure functions; nothing here knows about
TorchServe.

The model's exported graph does the whole detection, decoding and suppression included (models/detector.py):
for an (N, 3, S, S) batch it gives `boxes` (N, k, 4) [x0, y0, x1, y1] in input pixels, `scores` (N, k) best first
and `labels` (N, k) class indices (0 is the background). Requests are read and decoded as every image kind's are
(handlers/images.py: the three native forms and OIP, the same limits and errors); the preset letterboxes each
image into the model's square (models.preprocessing.LetterboxPreset), so images of any size share one forward pass.
Here each row keeps its detections at or over `score_threshold`, at most `max_detections`, and its boxes go back to
its own image's pixels (divided by the letterbox's scale, clipped to the image).

Both are also a request's own: OIP `parameters` {"score_threshold": 0.5, "max_detections": 5} (as Triton's and
KServe's clients send them), or a native request's query parameters (`?score_threshold=0.5&max_detections=5`).
A request may ask a threshold in [min_score_threshold, 1] and at most the config's max_detections; past those
bounds, or not a number, it gets a 400 naming the parameter. Unset, the config's values hold.

Native answer: `[{"label", "index", "score", "box": [x0, y0, x1, y1]}]`, best first.
OIP answer, for n rows: `boxes` FP32 [n, k, 4], `scores` FP32 [n, k], `labels` BYTES [n, k], `count` INT32 [n],
where k is the most detections any row of the request has (at least 1) and each row's entries past its `count` are
padding: zero boxes and scores, empty labels. The model metadata says so (each output's `parameters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from handlers import oip
from handlers import images
from handlers.images import ImageConfig, ImagePipeline, Size
from handlers.requests import RequestError

OUTPUTS = ("boxes", "scores", "labels", "count")
PADDING = "rows hold `count` detections, best first; the rest up to k (the most in any row of the answer) are padding"


@dataclass(frozen=True)
class DetectorConfig(ImageConfig):
    """A detector's settings: the least score a detection needs, and the most an image gets."""

    score_threshold: float = 0.3
    max_detections: int = 32
    min_score_threshold: float = 0.0  # the lowest threshold a request may ask for

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("score_threshold", "min_score_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"handler.{name} must be a number in [0, 1], got {value!r}")
        if self.min_score_threshold > self.score_threshold:
            raise ValueError(f"handler.min_score_threshold ({self.min_score_threshold}) is over handler.score_threshold "
                             f"({self.score_threshold})")


@dataclass(frozen=True)
class Knobs:
    """One request's detection settings."""

    threshold: float
    limit: int


def knobs(values: Mapping[str, Any], config: DetectorConfig) -> Knobs:
    """A request's settings from its parameters (numbers, or the text of a query parameter), within `config`'s
    bounds; RequestError naming the parameter otherwise."""

    def number(name: str) -> float | None:
        value = values.get(name)
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                value = None
        elif isinstance(value, bool) or (value is not None and not isinstance(value, (int, float))):
            value = None
        if name in values and (value is None or not math.isfinite(value)):
            raise RequestError(400, "InvalidParameter", f"parameter {name!r} must be a number")
        return value

    threshold, limit = number("score_threshold"), number("max_detections")
    if threshold is not None and not config.min_score_threshold <= threshold <= 1.0:
        raise RequestError(400, "InvalidParameter", f"parameter 'score_threshold' must be in "
                                                    f"[{config.min_score_threshold}, 1], got {threshold}")
    if limit is not None and (limit != int(limit) or not 1 <= limit <= config.max_detections):
        raise RequestError(400, "InvalidParameter", f"parameter 'max_detections' must be an integer in "
                                                    f"[1, {config.max_detections}], got {limit:g}")
    return Knobs(config.score_threshold if threshold is None else float(threshold),
                 config.max_detections if limit is None else int(limit))


def detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: Sequence[str], *,
               scale: float, size: Size, threshold: float, limit: int) -> list[dict[str, Any]]:
    """One row's detections (k, 4) / (k,) / (k,) in the model's input pixels -> those at or over `threshold`, at most
    `limit`, best first, with boxes divided by `scale` and clipped to the image of `size` (width, height)."""
    order = np.argsort(-scores, kind="stable")  # best first, ties in the model's order
    keep = order[scores[order] >= threshold][:limit]
    width, height = size
    found = []
    for box, score, label in zip((boxes[keep].astype(np.float64) / scale).tolist(), scores[keep].tolist(),
                                 labels[keep].tolist(), strict=True):
        x0, y0, x1, y1 = (min(max(v, 0.0), bound) for v, bound in zip(box, (width, height, width, height)))
        found.append({"label": names[label], "index": int(label), "score": round(score, 6),
                      "box": [round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)]})
    return found


def parse(answer: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A native answer read back (clients, evaluation, tests) -> boxes (k, 4) float32, scores (k,) float32 and
    class indices (k,) int64."""
    return (np.asarray([d["box"] for d in answer], dtype=np.float32).reshape(-1, 4),
            np.asarray([d["score"] for d in answer], dtype=np.float32),
            np.asarray([d["index"] for d in answer], dtype=np.int64))


class Detector(ImagePipeline):
    OUTPUTS = OUTPUTS

    def options(self, request: Mapping[str, Any], infer: oip.InferRequest | None) -> Knobs:
        return knobs(infer.parameters if infer is not None else request, self.config)

    def answers(self, outputs: list[np.ndarray], sizes: list[Size], options: Sequence[Knobs] = ()
                ) -> list[list[dict[str, Any]]]:
        boxes, scores, labels = outputs
        default = Knobs(self.config.score_threshold, self.config.max_detections)
        return [detections(boxes[i].astype(np.float32), scores[i].astype(np.float32), labels[i], self.labels,
                           scale=self.preset.scale(*size), size=size, threshold=row.threshold, limit=row.limit)
                for i, (size, row) in enumerate(zip(sizes, options or [default] * len(sizes), strict=True))]

    def infer_outputs(self, rows: list[list[dict[str, Any]]]) -> list[oip.Tensor]:
        k = max(1, *(len(row) for row in rows))
        pad = [[row[j] if j < len(row) else None for j in range(k)] for row in rows]
        n = len(rows)
        return [oip.Tensor("boxes", "FP32", (n, k, 4), [v for row in pad for d in row for v in (d["box"] if d else [0.0] * 4)]),
                oip.Tensor("scores", "FP32", (n, k), [d["score"] if d else 0.0 for row in pad for d in row]),
                oip.Tensor("labels", "BYTES", (n, k), [d["label"] if d else "" for row in pad for d in row]),
                oip.Tensor("count", "INT32", (n,), [len(row) for row in rows])]


Settings = DetectorConfig


def signature(export_manifest: dict, settings: DetectorConfig) -> dict:
    """OIP model metadata: one encoded image per row in; k (-1) varies per answer, as `parameters` says."""
    note = {"padding": PADDING, "max_detections": settings.max_detections, "score_threshold": settings.score_threshold}
    return {"inputs": images.input_signature(export_manifest),
            "outputs": [{"name": "boxes", "datatype": "FP32", "shape": [-1, -1, 4], "parameters": note},
                        {"name": "scores", "datatype": "FP32", "shape": [-1, -1], "parameters": note},
                        {"name": "labels", "datatype": "BYTES", "shape": [-1, -1], "parameters": note},
                        {"name": "count", "datatype": "INT32", "shape": [-1]}]}


def build(model_dir, export_manifest: dict, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
          settings: DetectorConfig, *, served_as: tuple[str, str], max_batch: int) -> Detector:
    return images.build(Detector, export_manifest, runner, settings, served_as=served_as, max_batch=max_batch)


# Export verification (export/verify.py): an export's detections against eager's, matched one to one.
VERIFY_FLOOR = 0.05  # detections scoring under this are noise, not checked
VERIFY_MARGIN = 1e-3  # scores this close are a tie an export may break either way (the tolerance on scores)


def compare(expected: Sequence[Any], got: Sequence[Any], floor: float = VERIFY_FLOOR,
            margin: float = VERIFY_MARGIN) -> dict:
    """(boxes, scores, labels) of a batch from eager (`expected`) and from an export (`got`), k detections an image.

    Per image, each expected detection that scores at least `floor` and clearly makes the k (over the k-th score by
    more than `margin`: one that ties for the last places may rightly be another peak in an export), best first,
    takes the unmatched detection of `got` with the same label and the greatest box IoU (torchvision.ops.box_iou).
    Figures: detections checked, `unmatched` (no same-label partner), `extra` (detections of `got` that clearly
    make its k, over `floor` + `margin`, that no expected one took), the least IoU and the largest score difference
    of the matched pairs. Either side's arrays may be torch tensors or NumPy arrays (a runner's)."""
    import torch
    from torchvision.ops import box_iou

    expected, got = ([torch.as_tensor(t) for t in side] for side in (expected, got))
    checked = unmatched = extra = 0
    min_iou, max_score_diff = 1.0, 0.0
    for e_boxes, e_scores, e_labels, g_boxes, g_scores, g_labels in zip(*expected, *got, strict=True):
        e_scores, g_scores = e_scores.float(), g_scores.float()
        iou = box_iou(e_boxes.float(), g_boxes.float())
        taken = torch.zeros(len(g_scores), dtype=torch.bool)
        e_bar, g_bar = max(floor, float(e_scores.min()) + margin), max(floor + margin, float(g_scores.min()) + margin)
        for i in torch.argsort(e_scores, descending=True, stable=True).tolist():
            if e_scores[i] < e_bar:
                break
            checked += 1
            candidates = (g_labels == e_labels[i]) & ~taken
            if not candidates.any():
                unmatched += 1
                continue
            j = int(torch.where(candidates, iou[i], torch.tensor(-1.0)).argmax())
            taken[j] = True
            min_iou = min(min_iou, float(iou[i, j]))
            max_score_diff = max(max_score_diff, abs(float(e_scores[i] - g_scores[j])))
        extra += int(((g_scores > g_bar) & ~taken).sum())
    return {"detections": checked, "unmatched": unmatched, "extra": extra, "min_box_iou": round(min_iou, 6),
            "max_score_diff": max_score_diff}


# What the kind's metric scores (models/kinds.py): one row of `Detector.answers` is a native answer's detections.
scored = parse
