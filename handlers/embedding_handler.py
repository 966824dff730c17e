"""TorchServe adapter for sentence embeddings: wires the pure pipeline in handlers.text_core into BaseHandler.

Packed into the model's .mar with the `models` and `handlers` packages, the export manifest (the text
preset), the tokenizer (tokenizer.json) and the model-config YAML (handler settings).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ts.torch_handler.base_handler import BaseHandler

from handlers.batch_metrics import StageClock, publish
from handlers.core import answer_all, content_types
from handlers.runtime import ThreadBudget, configure_cuda_math, load_runner, select_device
from handlers.text_core import EmbeddingConfig, SentenceEncoder
from models.text import TextPreset

logger = logging.getLogger(__name__)


class EmbeddingHandler(BaseHandler):
    """Batched sentence embeddings on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    def initialize(self, context) -> None:
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        config = EmbeddingConfig.from_mapping((context.model_yaml_config or {}).get("handler"))
        threads = ThreadBudget(intra_op=config.intra_op_threads)
        threads.apply_to_torch()
        self.device = select_device(properties.get("gpu_id"))
        configure_cuda_math(self.device, allow_tf32=False)
        export_manifest = json.loads((model_dir / "manifest.json").read_text())
        runner = load_runner(model_dir / context.manifest["model"]["serializedFile"], self.device, threads)
        self.encoder = SentenceEncoder(runner, TextPreset.from_description(export_manifest["preset"], model_dir), config)
        # one short and one full-length pass, so the first requests pay no one-off costs
        self.encoder.embed(self.encoder.preset.encode(["warm up", "warm " * 300]))
        logger.info("%s ready on %s with %s (%d intra-op threads)", context.model_name, self.device,
                    type(runner).__name__, threads.intra_op)
        self.initialized = True

    def handle(self, data, context):
        clock = StageClock()
        with clock.stage("preprocess"):
            batch = self.encoder.preprocess(data, content_types(context, len(data)))
        with clock.stage("inference"):
            embeddings = self.encoder.embed(batch.encoded)
        with clock.stage("postprocess"):
            answers = answer_all(context, self.encoder.postprocess(batch, embeddings))
        publish(context.metrics, len(data), clock)
        return answers
