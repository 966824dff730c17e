"""TorchServe adapter for image classifiers: the pure pipeline in handlers.image on handlers.adapter.

Packed into each classifier's .mar with the modules it imports (export.archive follows the imports), the
export manifest (preprocessing preset, input shape), index_to_name.json (labels) and the model-config YAML.
"""

from __future__ import annotations

import json
from pathlib import Path

from handlers.adapter import PipelineHandler
from handlers.image import ClassifierConfig, ImageClassifier
from models.preprocessing import build_preset
from models.runtime import Runner


class ClassifierHandler(PipelineHandler):
    """Batched image classification on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    settings_class = ClassifierConfig

    def build(self, model_dir: Path, export_manifest: dict, runner: Runner, settings: ClassifierConfig,
              context) -> ImageClassifier:
        labels = json.loads((model_dir / "index_to_name.json").read_text())
        return ImageClassifier(runner, build_preset(export_manifest["preset"]),
                               [labels[str(i)] for i in range(len(labels))], settings,
                               input_shape=export_manifest["inputs"][0]["example_shape"][1:],
                               max_batch=int(context.system_properties.get("batch_size") or 1),
                               served_as=self.served_as(context))
