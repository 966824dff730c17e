"""CenterNet ("Objects as Points", Zhou, Wang and Krähenbühl, 2019) on a ResNet-18 trunk, for the shapes scenes
(models/scenes.py), trained here from scratch.

CenterNet predicts, on a grid at a quarter of the input's resolution, a heatmap per class whose peaks are object
centres, and at each cell the object's size and the centre's sub-cell offset. Decoding is plain tensor work: a
3x3 max-pool keeps each local peak (this replaces non-maximum suppression), top-k picks the `max_detections`
strongest peaks over all classes, and the size and offset at each peak make its box. So `forward` is the whole
detector, post-processing included, with fixed output shapes, and every export format carries it:

    images (N, 3, H, W) float32, normalised  ->  boxes (N, k, 4) float32 [x0, y0, x1, y1] in input pixels,
                                                 scores (N, k) float32 in [0, 1], best first,
                                                 labels (N, k) int64, 1..num_classes - 1 (0: the background)

Every image gets k rows; the handler keeps those over its score threshold. H and W are any multiples of 16.

The trunk is torchvision's resnet18 (weights=None) to its third stage (stride 16), brought back to stride 4 by
two 3x3 convolutions each followed by a 2x nearest upsampling, as the paper's ResNet variant does (with plain
instead of deformable convolutions).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 4  # output grid cells per input pixel, each way


class CenterNet(nn.Module):
    def __init__(self, num_classes: int = 9, max_detections: int = 32, width: int = 64) -> None:
        """`num_classes` counts the background, as torchvision's detection models do: a heatmap per other class."""
        super().__init__()
        import torchvision

        trunk = torchvision.models.resnet18(weights=None)
        self.num_classes, self.max_detections = num_classes, max_detections
        self.trunk = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool, trunk.layer1, trunk.layer2,
                                   trunk.layer3)  # stride 16, 256 channels
        self.up = nn.Sequential(_up(256, 2 * width), _up(2 * width, width))  # stride 4
        # The heatmap's bias starts every class at a prior of 0.1 (the paper's -2.19), so the focal loss starts small.
        self.heatmap = _head(width, num_classes - 1, bias=-2.19)
        self.size = _head(width, 2)  # log of (w, h), in grid cells
        self.offset = _head(width, 2)  # the centre's position within its cell, (x, y)

    def heads(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The raw heads, for training: heatmap logits (N, C, H/4, W/4), log-size and offset (N, 2, H/4, W/4)."""
        features = self.up(self.trunk(images))
        return self.heatmap(features), self.size(features), self.offset(features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmap, size, offset = self.heads(images)
        return decode(heatmap, size, offset, self.max_detections)


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Upsample(scale_factor=2, mode="nearest"))


def _head(width: int, out: int, bias: float = 0.0) -> nn.Sequential:
    head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, out, 1))
    nn.init.constant_(head[-1].bias, bias)
    return head


def decode(heatmap: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, k: int, stride: int = STRIDE
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads -> the k best detections per image (see the module's docstring); `stride` is a parameter, not the
    module's constant, because torch.jit.script compiles no global."""
    heat = torch.sigmoid(heatmap)
    heat = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)  # local peaks only
    n, classes, h, w = heat.shape
    scores, index = heat.reshape(n, -1).topk(k, dim=1)
    # Each flat position's class, cell, row and column, looked up rather than computed by // and % of the index:
    # the ONNX exporter cannot divide by a size that is only known at run time (a dynamic height or width).
    cell = torch.arange(h * w, device=heat.device).reshape(1, h, w)
    ys, xs = torch.meshgrid(torch.arange(h, device=heat.device), torch.arange(w, device=heat.device), indexing="ij")
    plane = torch.ones(classes, 1, 1, dtype=torch.long, device=heat.device)
    per_class = torch.arange(classes, device=heat.device).reshape(classes, 1, 1)
    labels = (per_class * torch.ones_like(cell)).reshape(-1)[index] + 1
    cell = (plane * cell).reshape(-1)[index]
    ys, xs = (plane * ys).reshape(-1)[index].to(heat.dtype), (plane * xs).reshape(-1)[index].to(heat.dtype)
    at = cell[:, None, :].expand(n, 2, k)
    wh = size.reshape(n, 2, -1).gather(2, at).exp() * stride
    off = offset.reshape(n, 2, -1).gather(2, at)
    cx, cy = (xs + off[:, 0]) * stride, (ys + off[:, 1]) * stride
    boxes = torch.stack([cx - wh[:, 0] / 2, cy - wh[:, 1] / 2, cx + wh[:, 0] / 2, cy + wh[:, 1] / 2], dim=-1)
    return boxes, scores, labels


def targets(boxes: list[torch.Tensor], labels: list[torch.Tensor], side: int, heatmaps: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets for square images of `side` pixels: a Gaussian peak per object at its centre's cell on
    its class's heatmap (radius from the box's size, as the paper's), and at that cell its log-size and offset,
    with a mask of those cells. An object whose centre lies outside the image has no peak."""
    n, cells = len(boxes), side // STRIDE
    heat = torch.zeros(n, heatmaps, cells, cells)
    size, offset, mask = torch.zeros(n, 2, cells, cells), torch.zeros(n, 2, cells, cells), torch.zeros(n, cells, cells)
    grid = torch.arange(cells, dtype=torch.float32)
    for i, (image_boxes, image_labels) in enumerate(zip(boxes, labels, strict=True)):
        for (x0, y0, x1, y1), label in zip(image_boxes.tolist(), image_labels.tolist(), strict=True):
            cx, cy, w, h = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE, (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
            if not (0 <= cx < cells and 0 <= cy < cells) or w <= 0 or h <= 0:
                continue
            ix, iy = int(cx), int(cy)
            sx, sy = max(0.09 * w, 0.5), max(0.09 * h, 0.5)
            peak = torch.exp(-((grid[None, :] - ix) ** 2 / (2 * sx * sx) + (grid[:, None] - iy) ** 2 / (2 * sy * sy)))
            heat[i, label - 1] = torch.maximum(heat[i, label - 1], peak)
            size[i, :, iy, ix] = torch.tensor([math.log(w), math.log(h)])
            offset[i, :, iy, ix] = torch.tensor([cx - ix, cy - iy])
            mask[i, iy, ix] = 1.0
    return heat, size, offset, mask


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's penalty-reduced pixel-wise focal loss (alpha 2, beta 4), averaged over the objects."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).to(p.dtype)
    pos = torch.log(p) * (1 - p) ** 2 * positive
    neg = torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * (1 - positive)
    return -(pos.sum() + neg.sum()) / positive.sum().clamp(min=1)


def loss(model: CenterNet, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
         masks: torch.Tensor) -> torch.Tensor:
    """The training loss of one batch (the scene trainer's interface; masks are unused here): heatmap focal loss
    plus L1 on log-size and offset at the object centres."""
    heat, size, offset, at = targets(boxes, labels, images.shape[-1], model.num_classes - 1)
    p_heat, p_size, p_offset = model.heads(images)
    m = at[:, None]
    objects = at.sum().clamp(min=1)
    return (focal_loss(p_heat, heat) + (F.l1_loss(p_size * m, size * m, reduction="sum")
                                         + F.l1_loss(p_offset * m, offset * m, reduction="sum")) / objects)
