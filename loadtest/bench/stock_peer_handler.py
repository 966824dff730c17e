"""The peer: TorchServe's stock image-classification path, set up as a TorchServe user would without us.

TorchServe's own `ImageClassifier` (VisionHandler family) does the work: BaseHandler loads the
TorchScript file onto the worker's device, VisionHandler decodes each image with PIL and applies
`image_processing` one image at a time, ImageClassifier answers the top 5 with labels from
index_to_name.json. The only thing set here is `image_processing`: the model's preprocessing written
as torchvision transforms (from the preset in the export manifest), so the peer computes the same
inputs. No thread settings, no batching changes: TorchServe's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from ts.torch_handler.image_classifier import ImageClassifier

from models.preprocessing import build_preset


class StockImageClassifier(ImageClassifier):
    def initialize(self, context) -> None:
        super().initialize(context)
        manifest = json.loads((Path(context.system_properties["model_dir"]) / "manifest.json").read_text())
        self.image_processing = build_preset(manifest["preset"]).torchvision_transforms()
