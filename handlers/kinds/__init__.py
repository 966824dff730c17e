"""Model kinds: what a model does with a request, one module per kind.

A registry entry (models.registry) names its kind; everything specific to that kind lives in the kind's
module, and the generic code (the TorchServe adapter, export, verification, archiving, the control plane,
the test tiers) asks the kind instead of branching on its name. A kind module defines:

- `Settings`: its handler settings (a handlers.settings.HandlerSettings dataclass), the `handler:` section of
  the model-config YAML: limits per request and per batch, threads;
- `build(model_dir, export_manifest, runner, settings, *, served_as, max_batch) -> Pipeline`: the pure
  request pipeline (handlers.requests.Pipeline) that reads requests in the kind's native forms and as Open
  Inference Protocol infer requests, runs batches and writes answers and OIP outputs;
- `signature(export_manifest, settings) -> {"inputs", "outputs"}`: what an infer request takes and gives, each
  tensor's name, datatype and shape (-1: any size): the model metadata `GET /v2/models/<m>` answers, packed
  into the archive as `signature.json` (handlers/frontend serves it).

This table is the one list of kinds; it imports nothing (the registry reads it with any Python). `bench` names
the kind's bench workload (loadtest.bench.compute), `tolerance` how verification compares its outputs.

    image-classifier  images in, top-k labels out            (handlers/kinds/classify.py)
    text-embedding    texts in, one vector per text out      (handlers/kinds/text.py)
    tensor            named tensors in, named tensors out    (handlers/kinds/tensor.py)
    object-detector   images in, boxes, labels, scores out   (handlers/kinds/detect.py)
    image-segmenter   images in, a class per pixel out       (handlers/kinds/segment.py)
    generate          prompts in, tokens streamed out         (handlers/kinds/generate.py)

A kind may also define `compare(expected, got) -> figures`: how export verification compares an export's outputs
with eager's when elementwise differences say nothing useful (detections that may change order, class masks); the
registry entry's Tolerance bounds the figures.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


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


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("image-classifier", "handlers.kinds.classify", "loadtest.bench.compute:ImageWorkload",
         "max |diff| of the logits and top-1 agreement over the held-out split"),
    Kind("text-embedding", "handlers.kinds.text", "loadtest.bench.compute:TextWorkload",
         "max |diff| and cosine similarity per row against the reference library"),
    Kind("tensor", "handlers.kinds.tensor", "loadtest.bench.compute:TensorWorkload",
         "max |diff| per output (and top-1 agreement where the entry has a held-out split)"),
    Kind("object-detector", "handlers.kinds.detect", "loadtest.bench.compute:ImageWorkload",
         "detections matched one to one: same label, box IoU and score difference, over held-out scenes"),
    Kind("image-segmenter", "handlers.kinds.segment", "loadtest.bench.compute:ImageWorkload",
         "pixel agreement of the class masks over held-out scenes"),
    Kind("generate", "handlers.kinds.generate", "loadtest.bench.chat:ChatWorkload",
         "greedy tokens identical to the reference library's for every prompt", generates=True),
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
