"""The `shapes` dataset: colour photos of eight shape classes, generated here from a seed.

No download: every image is drawn by this module, and image i of a split depends only on (seed, split, i),
so the same seed gives the same images on any machine, in any order, in any process.

What makes it hard (a linear model on the pixels fails; see tests/unit/test_shapes.py):
- one main shape per image, of CLASSES, with a random fill colour, size (36-80 % of the side),
  rotation and position; ring and crescent holes show the background through;
- a textured background: a two-colour gradient, low-frequency colour noise, stripes or a checkerboard;
- clutter: 3 to 8 small distractors (dots, short lines, small outlines) in random colours;
- per-pixel Gaussian noise of random strength, and supersampled (antialiased) edges.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from models.digest import sha256
from models.durable import replacing
from models.paths import ROOT

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")
SIZE = 128
_SS = 2  # supersampling factor for antialiased edges
_SPLIT_IDS = {"train": 0, "test": 1, "samples": 2}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, n, 3) float32 texture in 0..255."""
    a, b = _color(rng), _color(rng)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    if kind == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = np.clip((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle) + 0.5, 0, 1)
    elif kind == 1:  # low-frequency noise
        grid = rng.random((5, 5)).astype(np.float32)
        t = np.asarray(Image.fromarray(grid).resize((n, n), Image.Resampling.BICUBIC)).clip(0, 1)
    elif kind == 2:  # stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.05, 0.2)
        t = (np.sin(2 * math.pi * ((xx * math.cos(angle) + yy * math.sin(angle)) / period)) > 0).astype(np.float32)
    else:  # checkerboard
        cells = int(rng.integers(4, 12))
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2).astype(np.float32)
    return a + (b - a) * t[..., None] * rng.uniform(0.3, 1.0)


def _polygon(cx: float, cy: float, radii: list[float], angles: list[float], rotation: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a + rotation), cy + r * math.sin(a + rotation)) for r, a in zip(radii, angles)]


def _regular(k: int) -> tuple[list[float], list[float]]:
    return [1.0] * k, [2 * math.pi * i / k for i in range(k)]


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, cx: float, cy: float, r: float, rot: float,
                rng: np.random.Generator) -> None:
    """Draw the shape's mask: 255 inside, 0 in its holes (the background shows through them)."""
    fill, bg = 255, 0
    if label == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif label == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = r * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=bg)
    elif label == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        offset = r * rng.uniform(0.45, 0.65)
        ox, oy = cx + offset * math.cos(rot), cy + offset * math.sin(rot)
        draw.ellipse([ox - r * 0.9, oy - r * 0.9, ox + r * 0.9, oy + r * 0.9], fill=bg)
    elif label in ("square", "triangle"):
        radii, angles = _regular(4 if label == "square" else 3)
        draw.polygon(_polygon(cx, cy, [r * x for x in radii], angles, rot), fill=fill)
    elif label == "star":
        inner = rng.uniform(0.38, 0.5)
        radii = [r if i % 2 == 0 else r * inner for i in range(10)]
        draw.polygon(_polygon(cx, cy, radii, [math.pi * i / 5 for i in range(10)], rot), fill=fill)
    elif label == "cross":
        w = r * rng.uniform(0.28, 0.4)
        for angle in (rot, rot + math.pi / 2):
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            draw.polygon([(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                          for x, y in corners], fill=fill)
    elif label == "arrow":
        w, head = r * 0.22, r * 0.55
        outline = [(-r, -w), (r - head, -w), (r - head, -2.2 * w), (r, 0), (r - head, 2.2 * w), (r - head, w), (-r, w)]
        draw.polygon([(cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot))
                      for x, y in outline], fill=fill)
    else:
        raise ValueError(f"unknown shape {label!r}")


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, n: int, max_size: float) -> None:
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in _color(rng))
        x, y = rng.uniform(0, n, size=2)
        s = rng.uniform(0.25, 1.0) * max_size
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=color)
        elif kind == 1:
            angle = rng.uniform(0, 2 * math.pi)
            draw.line([x, y, x + 1.5 * s * math.cos(angle), y + 1.5 * s * math.sin(angle)], fill=color, width=_SS * 2)
        else:
            draw.rectangle([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], outline=color, width=_SS)


def render(label_index: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One image of class CLASSES[label_index]: (size, size, 3) uint8."""
    n = size * _SS
    background = _background(rng, n)
    image = Image.fromarray(background.clip(0, 255).astype(np.uint8))
    r = rng.uniform(0.18, 0.40) * n  # half-extent: the shape spans 36-80 % of the side
    _clutter(ImageDraw.Draw(image), rng, n, max_size=r * 0.35)
    cx, cy = rng.uniform(r, n - r, size=2)
    mean_bg = background.reshape(-1, 3).mean(axis=0)
    fill = _color(rng)
    while np.abs(fill - mean_bg).sum() < 150:  # keep the shape visible against its background
        fill = _color(rng)
    mask = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(mask), CLASSES[label_index], cx, cy, r, rng.uniform(0, 2 * math.pi), rng)
    image = Image.composite(Image.new("RGB", (n, n), tuple(int(c) for c in fill)), image, mask)
    small = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = small + rng.normal(0.0, rng.uniform(0.0, 12.0), size=small.shape)
    return noisy.clip(0, 255).round().astype(np.uint8)


def generate(split: str, count: int, *, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of `split` ('train', 'test' or 'samples'): (count, size, size, 3) uint8 and labels.
    Classes are balanced (image i has class i mod 8 before the per-image randomness)."""
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    for i in range(count):
        images[i] = render(int(labels[i]), _rng(seed, split, i), size)
    return images, labels


CACHE = ROOT / "build" / "data"


def cached(split: str, count: int, *, seed: int = 0, cache: Path = CACHE) -> tuple[np.ndarray, np.ndarray]:
    """generate(), kept in `cache` as .npz so training and verification generate each split once.
    The file name holds everything the images depend on, and the generator's own source hash."""
    version = sha256(Path(__file__))[:12]
    path = cache / f"shapes-{split}-{count}-seed{seed}-{version}.npz"
    if path.exists():
        with np.load(path) as data:
            return data["images"], data["labels"]
    images, labels = generate(split, count, seed=seed)
    with replacing(path) as partial, open(partial, "wb") as out:  # builds run in parallel: each its own temp
        np.savez(out, images=images, labels=labels)
    return images, labels
