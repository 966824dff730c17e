"""TorchServe adapter for image classifiers: wires the pure pipeline in handlers.core into BaseHandler.

Packed into each classifier's .mar with the `models` and `handlers` packages, the export manifest
(preprocessing preset), index_to_name.json (labels) and the model-config YAML (handler settings).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from ts.torch_handler.base_handler import BaseHandler

from handlers.batch_metrics import StageClock, publish
from handlers.core import ClassifierConfig, ImageClassifier, answer_all, content_types
from handlers.runtime import ThreadBudget, configure_cuda_math, load_runner, select_device
from models.preprocessing import build_preset

logger = logging.getLogger(__name__)


class ClassifierHandler(BaseHandler):
    """Batched image classification on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        config = ClassifierConfig.from_mapping((context.model_yaml_config or {}).get("handler"))
        threads = ThreadBudget(intra_op=config.intra_op_threads)
        threads.apply_to_torch()
        self.device = select_device(properties.get("gpu_id"))
        configure_cuda_math(self.device, allow_tf32=config.allow_tf32)
        export_manifest = json.loads((model_dir / "manifest.json").read_text())
        labels = json.loads((model_dir / "index_to_name.json").read_text())
        runner = load_runner(model_dir / context.manifest["model"]["serializedFile"], self.device, threads,
                             half=config.precision == "fp16")
        self.classifier = ImageClassifier(
            runner, build_preset(export_manifest["preset"]), [labels[str(i)] for i in range(len(labels))], config
        )
        self._warm_up(int(properties.get("batch_size") or 1), export_manifest["inputs"][0]["example_shape"][1:])
        logger.info("%s ready on %s with %s (%d intra-op threads)", context.model_name, self.device,
                    type(runner).__name__, threads.intra_op)
        self.initialized = True

    def _warm_up(self, batch_size: int, sample_shape: list[int]) -> None:
        """Run the largest and smallest batches once so the first real requests pay no one-off costs."""
        for size in sorted({1, batch_size}):
            self.classifier.predict(torch.zeros((size, *sample_shape)))

    def handle(self, data, context):
        clock = StageClock()
        with clock.stage("preprocess"):
            batch = self.classifier.preprocess(data, content_types(context, len(data)))
        with clock.stage("inference"):
            logits = None if batch.inputs is None else self.classifier.infer(batch.inputs)
        with clock.stage("postprocess"):
            answers = answer_all(context, self.classifier.postprocess(batch, logits))
        publish(context.metrics, len(data), clock)
        return answers
