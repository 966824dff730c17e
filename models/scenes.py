"""Scenes for detection and segmentation: several shapes of models/shapes.py in one image, each with its box and
its pixels, generated here from a seed (no download).

Scene i of a split depends only on (seed, split, i), from streams of their own (a scene never repeats an image of
the `shapes` classifier's splits). Each scene has:
- a textured background and small clutter, drawn as shapes.py draws them (shared code, not a copy);
- 1 to MAX_OBJECTS shapes of shapes.CLASSES, each from small (a twentieth of the side across) to large (most of
  it), at any position, rotation and fill colour (kept apart from the background's);
- overlaps: later shapes are drawn over earlier ones, but a placement that would hide more than MAX_HIDDEN of a
  shape already drawn, or that would itself show less than 1 - MAX_HIDDEN, is drawn again elsewhere (up to a few
  tries, then left out), so every object keeps most of itself in view and its box means what it says;
- per-pixel noise and antialiased edges, as in shapes.py.

Targets, in the image's own pixels:
- `boxes` (k, 4) float32 [x0, y0, x1, y1]: the extent of the object's visible pixels, right and bottom edges
  exclusive (x1 = last column + 1), as torchvision's detection models and COCO's xywh (x0, y0, x1 - x0, y1 - y0)
  read them;
- `labels` (k,) int64 in 1..8: shapes.CLASSES[label - 1] (0 is the background, torchvision's convention);
- `mask` (H, W) uint8: each pixel's class as `labels` counts them, 0 for the background (semantic segmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.digest import sha256
from models.durable import replacing
from models.paths import ROOT
from models.shapes import _SS, CLASSES, _background, _clutter, _color, _draw_shape

SIZE = 160
MAX_OBJECTS = 6
MAX_HIDDEN = 0.4  # of an object's own area, at most, hidden by the objects drawn over it
MIN_PIXELS = 24  # an object smaller than this in the output image is not drawn
_TRIES = 6
_SPLIT_IDS = {"train": 0, "test": 1, "samples": 2}
_STREAM = 7919  # scenes draw from streams of their own: [seed, _STREAM + split, index]


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (k, 4) float32, x0 y0 x1 y1, right and bottom exclusive
    labels: np.ndarray  # (k,) int64, 1..len(CLASSES)
    mask: np.ndarray  # (H, W) uint8, 0 background, else a label


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM + _SPLIT_IDS[split], index])


def _place(rng: np.random.Generator, n: int) -> tuple[int, float, float, float, float]:
    """A class index, centre, half-extent and rotation, in supersampled pixels."""
    r = n * math.exp(rng.uniform(math.log(0.025), math.log(0.36)))  # sizes spread evenly on a log scale
    cx, cy = rng.uniform(r * 0.6, n - r * 0.6, size=2)  # a shape may run a little past the edge
    return int(rng.integers(len(CLASSES))), float(cx), float(cy), float(r), float(rng.uniform(0, 2 * math.pi))


def render(rng: np.random.Generator, size: int = SIZE) -> Scene:
    """One scene (see the module's docstring)."""
    n = size * _SS
    background = _background(rng, n)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(image), rng, n, max_size=n * 0.04)
    owner = np.zeros((n, n), dtype=np.int16)  # which object (1-based, in drawing order) each pixel shows
    areas: list[int] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _try in range(_TRIES):
            label, cx, cy, r, rotation = _place(rng, n)
            shape = Image.new("L", (n, n), 0)
            _draw_shape(ImageDraw.Draw(shape), CLASSES[label], cx, cy, r, rotation, rng)
            pixels = np.asarray(shape) >= 128
            area = int(pixels.sum())
            if area < MIN_PIXELS * _SS * _SS:
                continue
            covered = np.bincount(owner[pixels], minlength=len(areas) + 1)[1:]
            visible = np.bincount(owner.ravel(), minlength=len(areas) + 1)[1:] - covered
            if all(v >= (1 - MAX_HIDDEN) * a for v, a in zip(visible, areas)):
                break
        else:
            continue  # no placement left every object in view: this one is left out
        fill = _color(rng)
        local = np.asarray(image, dtype=np.float32)[pixels].mean(axis=0)
        while np.abs(fill - local).sum() < 150:  # keep the shape visible against what is behind it
            fill = _color(rng)
        image = Image.composite(Image.new("RGB", (n, n), tuple(int(c) for c in fill)), image, shape)
        owner[pixels] = len(areas) + 1
        areas.append(area)
        classes.append(label + 1)
    small = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = (small + rng.normal(0.0, rng.uniform(0.0, 10.0), size=small.shape)).clip(0, 255).round().astype(np.uint8)
    # The owner of each output pixel: the supersampled block's most common owner.
    blocks = owner.reshape(size, _SS, size, _SS).transpose(0, 2, 1, 3).reshape(size, size, _SS * _SS)
    counts = np.stack([(blocks == k).sum(axis=-1) for k in range(len(areas) + 1)], axis=-1)
    out_owner = counts.argmax(axis=-1)
    boxes, labels = [], []
    mask = np.zeros((size, size), dtype=np.uint8)
    for k, label in enumerate(classes, start=1):
        ys, xs = np.nonzero(out_owner == k)
        if len(ys) < MIN_PIXELS:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(label)
        mask[out_owner == k] = label
    return Scene(noisy, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), mask)


def generate(split: str, count: int, *, seed: int = 0, size: int = SIZE) -> list[Scene]:
    """`count` scenes of `split` ('train', 'test' or 'samples')."""
    return [render(scene_rng(seed, split, i), size) for i in range(count)]


CACHE = ROOT / "build" / "data"


def cached(split: str, count: int, *, seed: int = 0, size: int = SIZE, cache: Path = CACHE) -> list[Scene]:
    """generate(), kept in `cache` as one .npz (boxes and labels of all scenes concatenated, with each scene's
    offset), named by everything the scenes depend on and the sources of this module and shapes.py."""
    version = (sha256(Path(__file__))[:8] + sha256(Path(__file__).with_name("shapes.py"))[:8])
    path = cache / f"scenes-{split}-{count}-seed{seed}-{size}-{version}.npz"
    if not path.exists():
        scenes = generate(split, count, seed=seed, size=size)
        offsets = np.cumsum([0] + [len(s.labels) for s in scenes])
        with replacing(path) as partial, open(partial, "wb") as out:  # builds run in parallel: each its own temp
            np.savez_compressed(out, images=np.stack([s.image for s in scenes]), masks=np.stack([s.mask for s in scenes]),
                                boxes=np.concatenate([s.boxes for s in scenes]),
                                labels=np.concatenate([s.labels for s in scenes]), offsets=offsets)
    with np.load(path) as data:  # each key read once: an NpzFile decompresses the whole array at every access
        images, masks, boxes, labels, o = (data[k] for k in ("images", "masks", "boxes", "labels", "offsets"))
    return [Scene(images[i], boxes[o[i]:o[i + 1]], labels[o[i]:o[i + 1]], masks[i]) for i in range(len(o) - 1)]
