"""Semantic segmentation of the shapes scenes (models/scenes.py): torchvision's LR-ASPP (Lite Reduced Atrous
Spatial Pyramid Pooling, from "Searching for MobileNetV3", Howard et al., 2019) on a MobileNetV3 backbone, trained
here from scratch (weights=None, weights_backbone=None).

`forward` is the served contract, the per-pixel argmax included, so every export carries it:

    images (N, 3, H, W) float32, normalised  ->  mask (N, H, W) uint8, each pixel's class (0: background)

`logits` gives the (N, classes, H, W) scores training needs. H and W are any size; LR-ASPP's own bilinear
upsampling brings its stride-8 prediction back to the input's.

torchvision builds LR-ASPP on MobileNetV3-Large only; `backbone="small"` puts the same head on MobileNetV3-Small
the way torchvision's builder does for Large (the last stride-8 block feeds the low branch, the dilated last
stage the high branch), for a third of the compute.
"""

from __future__ import annotations

import torch
from torch import nn


class Segmenter(nn.Module):
    def __init__(self, num_classes: int = 9, backbone: str = "large", bn_momentum: float = 0.1) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v3_small
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        from torchvision.models.segmentation.lraspp import LRASPP

        if backbone == "large":
            self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        elif backbone == "small":
            features = mobilenet_v3_small(weights=None, dilated=True).features
            # Stage ends: the blocks that reduce resolution (torchvision marks them _is_cn), as its Large builder.
            stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
            low, high = stages[-4], stages[-1]
            body = IntermediateLayerGetter(features, return_layers={str(low): "low", str(high): "high"})
            self.net = LRASPP(body, features[low].out_channels, features[high].out_channels, num_classes)
        elif backbone == "resnet18":
            from torchvision.models import resnet18

            trunk = resnet18(weights=None)
            body = nn.Sequential()
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
                body.add_module(name, getattr(trunk, name))
            # layer2 (stride 8, 128 channels) feeds the low branch, layer3 (stride 16, 256) the high one.
            self.net = LRASPP(IntermediateLayerGetter(body, return_layers={"layer2": "low", "layer3": "high"}), 128, 256,
                              num_classes)
        else:
            raise ValueError(f"backbone must be 'large', 'small' or 'resnet18', got {backbone!r}")
        # MobileNetV3's BatchNorm keeps 1 % of each batch in its running statistics (momentum 0.01), which lags a
        # model trained from scratch for minutes; 0.1 (PyTorch's default) tracks it.
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = bn_momentum

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)["out"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(dim=1).to(torch.uint8)


def loss(model: Segmenter, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
         masks: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch (the scene trainer's interface; boxes and labels are unused here): per-pixel
    cross-entropy."""
    return nn.functional.cross_entropy(model.logits(images), masks.long())
