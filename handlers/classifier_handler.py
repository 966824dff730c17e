"""TorchServe adapter for image classifiers: the pure pipeline in handlers.core on handlers.adapter.

Packed into each classifier's .mar with the `models` and `handlers` packages, the export manifest
(preprocessing preset), index_to_name.json (labels) and the model-config YAML (handler settings).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from handlers.adapter import PipelineHandler
from handlers.core import ClassifierConfig, ImageClassifier
from models.preprocessing import build_preset


class ClassifierHandler(PipelineHandler):
    """Batched image classification on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    config_class = ClassifierConfig

    def build(self, model_dir: Path, export_manifest: dict, runner, config, properties: dict) -> ImageClassifier:
        labels = json.loads((model_dir / "index_to_name.json").read_text())
        self.batch_size = int(properties.get("batch_size") or 1)
        self.sample_shape = export_manifest["inputs"][0]["example_shape"][1:]
        return ImageClassifier(runner, build_preset(export_manifest["preset"]),
                               [labels[str(i)] for i in range(len(labels))], config)

    def warm_up(self) -> None:
        """The largest and smallest batches, once each."""
        for size in sorted({1, self.batch_size}):
            self.pipeline.predict(torch.zeros((size, *self.sample_shape)))
