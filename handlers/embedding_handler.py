"""TorchServe adapter for sentence embeddings: the pure pipeline in handlers.text on handlers.adapter.

Packed into the model's .mar with the modules it imports (export.archive follows the imports), the export
manifest (the text preset), the tokenizer (tokenizer.json) and the model-config YAML (handler settings).
"""

from __future__ import annotations

from pathlib import Path

from handlers.adapter import PipelineHandler
from handlers.text import EmbeddingConfig, SentenceEncoder
from models.runtime import Runner
from models.text import TextPreset


class EmbeddingHandler(PipelineHandler):
    """Batched sentence embeddings on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    settings_class = EmbeddingConfig

    def build(self, model_dir: Path, export_manifest: dict, runner: Runner, settings: EmbeddingConfig,
              context) -> SentenceEncoder:
        return SentenceEncoder(runner, TextPreset.from_description(export_manifest["preset"], model_dir), settings,
                               served_as=self.served_as(context))
