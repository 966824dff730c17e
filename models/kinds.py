"""The table of model kinds: what a model does with a request. It sits at the bottom of the project (it imports
no module of it: the registry, handlers, export, the bench and the tests all read it), and each kind's code lives in
the one module the table names (handlers/kinds/; handlers/kinds/__init__.py says what such a module defines).

Each kind declares here, besides its module: its bench workload (`bench`, loadtest.bench), how verification
compares its exports with eager (`comparison`, for the docs and reports; the elementwise tolerance types or its
module's `compare`), its headline metric and the maintained library that scores it (`metric`, `headline`: the
figure training, the offline evaluation and the evaluation through the server report), whether it answers token by
token (`generates`) and whether `make mobile` lowers it to a device with ExecuTorch (`lowers`).

    image-classifier  images in, top-k labels out            (handlers/kinds/classify.py)
    text-embedding    texts in, one vector per text out      (handlers/kinds/text.py)
    tensor            named tensors in, named tensors out    (handlers/kinds/tensor.py)
    object-detector   images in, boxes, labels, scores out   (handlers/kinds/detect.py)
    image-segmenter   images in, a class per pixel out       (handlers/kinds/segment.py)
    generate          prompts in, tokens streamed out         (handlers/kinds/generate.py)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

# Input and output dtypes (torch's names, as registry entries and export manifests write them) -> the Open
# Inference Protocol's datatype.
DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
             "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


@dataclass(frozen=True)
class Kind:
    name: str
    module: str  # the kind's module: Settings, build and signature
    bench: str  # "module:class" of its compute workload for `make bench`
    comparison: str  # how verification compares outputs, for the docs and reports
    generates: bool = False  # answers token by token from a scheduler that keeps sequences between calls
    # "module:function(predictions, scenes, num_classes) -> figures" from maintained libraries (None: the kind is
    # judged by accuracy, cosine or token parity instead); its module's `scored(row)` turns one answer into a
    # prediction; `headline` names the figure a recipe's min_accuracy bounds.
    metric: str | None = None
    headline: str | None = None
    lowers: bool = False  # `make mobile` lowers its models with ExecuTorch (an image in, scores out)
    # The module whose `main(["--checkpoint", folder, "--out", folder])` exports the kind's models and verifies the
    # exports against eager in one step (None: export.export, then export.verify with the module's `compare`).
    exporter: str | None = None

    def score(self, predictions: Sequence[Any], scenes: Sequence[Any], num_classes: int) -> dict:
        """The kind's held-out figures of `predictions` (one per scene, as its module's `scored` makes them)."""
        if self.metric is None:
            raise ValueError(f"the {self.name} kind declares no metric; kinds with one: "
                             f"{sorted(k.name for k in KINDS.values() if k.metric)}")
        module, _, function = self.metric.partition(":")
        return getattr(importlib.import_module(module), function)(predictions, scenes, num_classes)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("image-classifier", "handlers.kinds.classify", "loadtest.bench.compute:ImageWorkload",
         "max |diff| of the logits and top-1 agreement over the held-out split", lowers=True),
    Kind("text-embedding", "handlers.kinds.text", "loadtest.bench.compute:TextWorkload",
         "max |diff| and cosine similarity per row against the reference library"),
    Kind("tensor", "handlers.kinds.tensor", "loadtest.bench.compute:TensorWorkload",
         "max |diff| per output (and top-1 agreement where the entry has a held-out split)"),
    Kind("object-detector", "handlers.kinds.detect", "loadtest.bench.compute:ImageWorkload",
         "detections matched one to one: same label, box IoU and score difference, over held-out scenes",
         metric="models.scene_metrics:detection", headline="map_50"),
    Kind("image-segmenter", "handlers.kinds.segment", "loadtest.bench.compute:ImageWorkload",
         "pixel agreement of the class masks over held-out scenes",
         metric="models.scene_metrics:segmentation", headline="miou"),
    Kind("generate", "handlers.kinds.generate", "loadtest.bench.chat:ChatWorkload",
         "greedy tokens of each exported decoder identical to the eager decoder's (export/decoder.py)",
         generates=True, exporter="export.decoder"),
)}


def get(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown model kind {name!r}; kinds: {', '.join(KINDS)}") from None


def load(name: str) -> ModuleType:
    """The kind's module, imported."""
    return importlib.import_module(get(name).module)


def module_file(name: str) -> Path:
    """The kind module's file, relative to the repository root (what an archive of the kind must carry)."""
    return Path(*get(name).module.split(".")).with_suffix(".py")
