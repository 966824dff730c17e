"""TorchServe's entry point for every model of ours: the handler file each archive names (`--handler`).

Packed into each .mar with the modules it imports and its kind's module (export.archive follows the imports),
the export manifest (kind, preset, inputs and outputs, labels), the kind's assets (a tokenizer) and the
model-config YAML. The kind is read from the export manifest when the worker starts (handlers.adapter).
"""

from __future__ import annotations

from handlers.adapter import PipelineHandler


class ModelHandler(PipelineHandler):
    """Batched inference on the worker's device (cuda:<gpu_id> when it has one, else CPU), for any kind."""
