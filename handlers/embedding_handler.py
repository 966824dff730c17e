"""TorchServe adapter for sentence embeddings: the pure pipeline in handlers.text_core on handlers.adapter.

Packed into the model's .mar with the `models` and `handlers` packages, the export manifest (the text
preset), the tokenizer (tokenizer.json) and the model-config YAML (handler settings).
"""

from __future__ import annotations

from pathlib import Path

from handlers.adapter import PipelineHandler
from handlers.text_core import EmbeddingConfig, SentenceEncoder
from models.text import TextPreset


class EmbeddingHandler(PipelineHandler):
    """Batched sentence embeddings on the worker's device (cuda:<gpu_id> when it has one, else CPU)."""

    config_class = EmbeddingConfig

    def build(self, model_dir: Path, export_manifest: dict, runner, config, properties: dict) -> SentenceEncoder:
        return SentenceEncoder(runner, TextPreset.from_description(export_manifest["preset"], model_dir), config)

    def warm_up(self) -> None:
        """One short and one full-length pass."""
        self.pipeline.embed(self.pipeline.preset.encode(["warm up", "warm " * 300]))
