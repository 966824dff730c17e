"""The peer of a detector: TorchServe's stock object-detection path, set up as a TorchServe user would without us.

TorchServe's own `ObjectDetector` (VisionHandler family) does the work: BaseHandler loads the TorchScript file,
VisionHandler decodes each image with PIL and applies `image_processing` one image at a time, ObjectDetector keeps
the detections scoring at least its threshold (0.5) and names them from index_to_name.json. Set here: the model's
preprocessing as torchvision transforms (the letterbox of the export manifest's preset), and `inference`, which
hands ObjectDetector the per-image dicts of boxes, labels and scores torchvision's detection models return (our
exported graph returns the three as tensors). Boxes stay in the model's input pixels: the stock handler has no
way back to each image's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ts.torch_handler.object_detector import ObjectDetector

from models.preprocessing import build_preset


class StockObjectDetector(ObjectDetector):
    def initialize(self, context) -> None:
        super().initialize(context)
        manifest = json.loads((Path(context.system_properties["model_dir"]) / "manifest.json").read_text())
        self.image_processing = build_preset(manifest["preset"]).torchvision_transforms()

    def inference(self, data, *args, **kwargs):
        boxes, scores, labels = super().inference(data, *args, **kwargs)
        return [{"boxes": b, "labels": l, "scores": s} for b, s, l in zip(boxes, scores, labels)]
