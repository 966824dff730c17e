"""The image-segmenter kind: images in, a class per pixel out. Pure functions; nothing here knows about TorchServe.

The model's exported graph gives each pixel's class, the argmax included (models/segmenter.py): (N, 3, S, S) ->
(N, S, S) uint8. Requests are read and decoded as every image kind's are (handlers/images.py); the preset
letterboxes each image into the model's square (models.preprocessing.LetterboxPreset), so images of any size share
one forward pass. Here each row's mask is cut to its image's part of the square and scaled back to the image's own
size (nearest neighbour: classes are not blended).

Native answer: `{"width", "height", "mask": "<base64 PNG>", "classes": {label: fraction of the pixels}}`; the PNG is
8-bit grayscale at the original size, each pixel's value its class index (0 is the background), the classes those
present, largest first.
OIP answer, for n rows: `mask` UINT8 [n, h, w] (h, w: the largest height and width among the request's rows; each
row's mask at its top left, the rest padding of 255), `size` INT32 [n, 2] (each row's height and width), and
`fraction` FP32 [n, classes]. The model metadata says so (the mask output's `parameters`).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from handlers import oip
from handlers import images
from handlers.images import ImageConfig, ImagePipeline, Size
from models.runtime import host_array

OUTPUTS = ("mask", "size", "fraction")
PAD = 255  # no class has this index
PADDING = ("each row's mask is at the top left of [h, w], the largest height and width in the answer; `size` gives "
           f"its own height and width; the rest is {PAD}")


@dataclass(frozen=True)
class SegmenterConfig(ImageConfig):
    """A segmenter's settings: the image limits every image kind has."""


@dataclass
class Segmentation:
    mask: np.ndarray  # (height, width) uint8, at the image's own size
    fractions: np.ndarray  # (classes,) float, each class's share of the pixels


def restore(mask: np.ndarray, content: Size, size: Size, classes: int) -> Segmentation:
    """One row's (S, S) mask -> its image's part (`content`, (width, height) in the square) at the image's `size`."""
    width, height = size
    part = np.ascontiguousarray(mask[:content[1], :content[0]], dtype=np.uint8)
    if (part.shape[1], part.shape[0]) != (width, height):
        part = np.asarray(Image.fromarray(part).resize((width, height), Image.Resampling.NEAREST))
    counts = np.bincount(part.ravel(), minlength=classes)[:classes]
    return Segmentation(part, counts / part.size)


def png(mask: np.ndarray) -> str:
    """A class mask as base64 of an 8-bit grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse(answer: dict) -> np.ndarray:
    """A native answer read back (clients, evaluation, tests) -> its class mask, (height, width) uint8."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["mask"]))))


class Segmenter(ImagePipeline):
    OUTPUTS = OUTPUTS

    def answers(self, outputs: list[np.ndarray], sizes: list[Size], options: Sequence[Any] = ()
                ) -> list[Segmentation]:
        return [restore(outputs[0][i], self.preset.content(*size), size, len(self.labels))
                for i, size in enumerate(sizes)]

    def native(self, answer: Segmentation) -> str:
        height, width = answer.mask.shape
        present = sorted((i for i in range(len(self.labels)) if answer.fractions[i] > 0),
                         key=lambda i: -answer.fractions[i])
        return json.dumps({"width": width, "height": height, "mask": png(answer.mask),
                           "classes": {self.labels[i]: round(float(answer.fractions[i]), 6) for i in present}})

    def infer_outputs(self, rows: list[Segmentation]) -> list[oip.Tensor]:
        height, width = max(r.mask.shape[0] for r in rows), max(r.mask.shape[1] for r in rows)
        masks = np.full((len(rows), height, width), PAD, dtype=np.uint8)
        for i, row in enumerate(rows):
            masks[i, :row.mask.shape[0], :row.mask.shape[1]] = row.mask
        return [oip.Tensor("mask", "UINT8", masks.shape, masks),
                oip.Tensor("size", "INT32", (len(rows), 2), [v for r in rows for v in r.mask.shape]),
                oip.Tensor("fraction", "FP32", (len(rows), len(self.labels)),
                           [round(float(v), 6) for r in rows for v in r.fractions])]


Settings = SegmenterConfig


def signature(export_manifest: dict, settings: SegmenterConfig) -> dict:
    """OIP model metadata: one encoded image per row in; the mask's height and width (-1) vary per answer."""
    return {"inputs": images.input_signature(export_manifest),
            "outputs": [{"name": "mask", "datatype": "UINT8", "shape": [-1, -1, -1],
                         "parameters": {"padding": PADDING, "labels": list(export_manifest["labels"])}},
                        {"name": "size", "datatype": "INT32", "shape": [-1, 2]},
                        {"name": "fraction", "datatype": "FP32", "shape": [-1, len(export_manifest["labels"])]}]}


def build(model_dir, export_manifest: dict, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
          settings: SegmenterConfig, *, served_as: tuple[str, str], max_batch: int) -> Segmenter:
    return images.build(Segmenter, export_manifest, runner, settings, served_as=served_as, max_batch=max_batch)


def compare(expected: Sequence[Any], got: Sequence[Any]) -> dict:
    """Export verification (export/verify.py): the share of pixels whose class an export gives as eager does (torch
    tensors or NumPy arrays either side)."""
    (e,), (g,) = ([np.asarray(host_array(t), dtype=np.uint8) for t in side] for side in (expected, got))
    if e.shape != g.shape:
        return {"pixel_agreement": 0.0, "pixels": int(e.size)}
    return {"pixel_agreement": float((e == g).mean()), "pixels": int(e.size)}


def scored(row: "Segmentation") -> np.ndarray:
    """One row of `Segmenter.answers` as the kind's metric scores it (models/kinds.py): its class mask."""
    return row.mask
