"""The peer of a segmenter: TorchServe's stock image-segmentation path, set up as a TorchServe user would without us.

TorchServe's own `ImageSegmenter` (VisionHandler family) does the work: BaseHandler loads the TorchScript file,
VisionHandler decodes each image with PIL and applies `image_processing` one image at a time, and the answer is
the per-pixel result as nested JSON lists. Set here: the model's preprocessing as torchvision transforms (the
letterbox of the export manifest's preset), and `postprocess`: the stock one takes a dict's "out" logits through a
softmax into [class, probability] per pixel, while our exported graph ends in the argmax, so each pixel's class
alone is listed, at the model's input size (the stock handler has no way back to each image's own).
"""

from __future__ import annotations

import json
from pathlib import Path

from ts.torch_handler.image_segmenter import ImageSegmenter

from models.preprocessing import build_preset


class StockImageSegmenter(ImageSegmenter):
    def initialize(self, context) -> None:
        super().initialize(context)
        manifest = json.loads((Path(context.system_properties["model_dir"]) / "manifest.json").read_text())
        self.image_processing = build_preset(manifest["preset"]).torchvision_transforms()

    def postprocess(self, data):
        return [mask.tolist() for mask in data]
