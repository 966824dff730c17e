"""The TorchServe side every handler of ours shares: one worker's set-up, and one batch through a pipeline.

A pipeline (handlers.core.ImageClassifier, handlers.text_core.SentenceEncoder) is pure: `preprocess`
(requests -> a batch, bad requests already answered), `run` (the batch's forward passes) and `postprocess`
(per request, a JSON string or a RequestError). `PipelineHandler` reads the model config's `handler:`
section, fixes the worker's threads and device, loads the archive's model with the runtime backend, has
the subclass build its pipeline, times the three stages and publishes them as metrics per batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ts.torch_handler.base_handler import BaseHandler

from handlers.batch_metrics import StageClock, publish
from handlers.core import answer_all, content_types
from handlers.runtime import ThreadBudget, configure_cuda_math, load_runner, select_device

logger = logging.getLogger(__name__)


class PipelineHandler(BaseHandler):
    """Subclasses set `config_class` (with `from_mapping` and `intra_op_threads`; `allow_tf32` and
    `precision` where they apply) and implement `build` and `warm_up`."""

    config_class: Any = None

    def build(self, model_dir: Path, export_manifest: dict, runner, config, properties: dict) -> Any:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run the pipeline once on stand-in input so the first real requests pay no one-off costs."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        config = self.config_class.from_mapping((context.model_yaml_config or {}).get("handler"))
        threads = ThreadBudget(intra_op=config.intra_op_threads)
        threads.apply_to_torch()
        self.device = select_device(properties.get("gpu_id"))
        configure_cuda_math(self.device, allow_tf32=getattr(config, "allow_tf32", False))
        export_manifest = json.loads((model_dir / "manifest.json").read_text())
        runner = load_runner(model_dir / context.manifest["model"]["serializedFile"], self.device, threads,
                             half=getattr(config, "precision", "fp32") == "fp16")
        self.pipeline = self.build(model_dir, export_manifest, runner, config, properties)
        self.warm_up()
        logger.info("%s ready on %s with %s (%d intra-op threads)", context.model_name, self.device,
                    type(runner).__name__, threads.intra_op)
        self.initialized = True

    def handle(self, data, context):
        clock = StageClock()
        with clock.stage("preprocess"):
            batch = self.pipeline.preprocess(data, content_types(context, len(data)))
        with clock.stage("inference"):
            outputs = self.pipeline.run(batch)
        with clock.stage("postprocess"):
            answers = answer_all(context, self.pipeline.postprocess(batch, outputs))
        publish(context.metrics, len(data), clock)
        return answers
