"""Training on the shapes scenes (models/scenes.py), shared by the detector and the segmenter: one loop, each
architecture bringing its own loss (`loss(model, images, boxes, labels, masks)`) and scored by
models/scene_metrics.py.

    make train MODEL=shapes-detector        # models.train hands a scene model's entry to `train` here

Each step takes a batch of train scenes, each cut to a random square crop of the epoch's side (TrainSpec
epoch_sizes: a crop keeps every object at its own scale and costs a fraction of the whole scene), flipped and
turned by a multiple of 90 degrees; boxes and masks go through the same transform. Deterministic for a seed on
the CPU. Scored on the held-out scenes at their full size.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from models import scenes
from models.progress import Eta
from models.registry import TrainSpec

# Forward passes in bfloat16 (autocast; weights, gradients and the optimiser stay fp32) where the CPU multiplies
# bfloat16 matrices in hardware (AMX): twice the images a second for ResNet convolutions on this host, nothing for
# MobileNet's depthwise ones (docs/models.md). Elsewhere bfloat16 would be emulated and slower, so fp32.
BF16 = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def transform(image: torch.Tensor, mask: torch.Tensor, boxes: torch.Tensor, *, top: int, left: int, side: int,
              flip: bool, turns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scene ((3, H, W) image, (H, W) mask, (k, 4) boxes) cut to the `side` square at (top, left), mirrored left
    to right when `flip`, then turned `turns` quarter turns counterclockwise (torch.rot90). Returns the image, the
    mask, the boxes clipped to the crop, and which boxes keep at least 2 pixels each way."""
    image, mask = image[:, top:top + side, left:left + side], mask[top:top + side, left:left + side]
    b = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    b = b.clamp(0, side)
    if flip:
        image, mask = image.flip(-1), mask.flip(-1)
        b = torch.stack([side - b[:, 2], b[:, 1], side - b[:, 0], b[:, 3]], dim=1)
    for _ in range(turns % 4):  # a quarter turn counterclockwise takes (x, y) to (y, side - x)
        image, mask = image.rot90(1, (-2, -1)), mask.rot90(1, (-2, -1))
        b = torch.stack([b[:, 1], side - b[:, 2], b[:, 3], side - b[:, 0]], dim=1)
    keep = ((b[:, 2] - b[:, 0]) >= 2) & ((b[:, 3] - b[:, 1]) >= 2)
    return image, mask, b, keep


@dataclass
class Data:
    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: torch.Tensor  # (N, H, W) uint8
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    def of(cls, split: list[scenes.Scene]) -> "Data":
        return cls(torch.from_numpy(np.stack([s.image for s in split])).permute(0, 3, 1, 2).contiguous(),
                   torch.from_numpy(np.stack([s.mask for s in split])),
                   [torch.from_numpy(s.boxes) for s in split], [torch.from_numpy(s.labels) for s in split])


def batch(data: Data, index: list[int], side: int, generator: torch.Generator, preset):
    """The scenes at `index`, each through its own random transform."""
    full = data.images.shape[-1]
    images, masks, boxes, labels = [], [], [], []
    for i in index:
        top, left = (torch.randint(0, full - side + 1, (2,), generator=generator).tolist() if side < full else (0, 0))
        flip, turns = bool(torch.randint(0, 2, (1,), generator=generator)), int(torch.randint(0, 4, (1,), generator=generator))
        image, mask, b, keep = transform(data.images[i], data.masks[i], data.boxes[i], top=top, left=left, side=side,
                                         flip=flip, turns=turns)
        images.append(image), masks.append(mask), boxes.append(b[keep]), labels.append(data.labels[i][keep])
    x = preset.normalise(torch.stack(images)).contiguous(memory_format=torch.channels_last)
    return x, boxes, labels, torch.stack(masks)


def fit(model: torch.nn.Module, loss: Callable, recipe: TrainSpec, preset, *, log: Callable[[str], None] = print,
        evaluate: Callable[[torch.nn.Module], float] | None = None) -> dict:
    """Train `model` in place with `recipe` on `recipe.dataset_kwargs["train"]` scenes (seed recipe.seed), normalised
    by the served preset (models.preprocessing.LetterboxPreset); AdamW with a one-cycle schedule. Returns
    {"train_scenes", "steps", "bf16_autocast", "train_seconds"}."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.monotonic()
    data = Data.of(scenes.cached("train", recipe.dataset_kwargs["train"], seed=recipe.dataset_kwargs.get("seed", 0)))
    full = data.images.shape[-1]
    sides = recipe.epoch_sizes or (full,) * recipe.epochs
    steps_per_epoch = len(data.masks) // recipe.batch_size
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch,
                                                    pct_start=0.15)
    log(f"{len(data.masks)} train scenes ready in {time.monotonic() - started:.1f}s; {recipe.epochs} epochs of "
        f"{steps_per_epoch} steps, crops {list(sides)}")
    eta = Eta([side * side for side in sides])
    for epoch, side in enumerate(sides, 1):
        order = torch.randperm(len(data.masks), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            x, boxes, labels, masks = batch(data, order[step * recipe.batch_size:(step + 1) * recipe.batch_size].tolist(),
                                            side, generator, preset)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                value = loss(model, x, boxes, labels, masks)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            scheduler.step()
            total += value.item()
        progress = (f"epoch {epoch}/{recipe.epochs} at {side} px  loss {total / steps_per_epoch:.4f}  "
                    f"{time.monotonic() - started:6.1f}s  {eta.epoch_done()}")
        if evaluate is not None and epoch % 8 == 0 and epoch < recipe.epochs:
            progress += f"  held-out (100 scenes) {evaluate(model):.4f}"
            model.train()
        log(progress)
    model.eval()
    return {"train_scenes": len(data.masks), "steps": recipe.epochs * steps_per_epoch, "bf16_autocast": BF16,
            "train_seconds": round(time.monotonic() - started, 1)}


def predict(model: torch.nn.Module, split: list[scenes.Scene], preset, *, chunk: int = 50) -> list:
    """The eval-mode model's outputs per scene (numpy), in order: (boxes, scores, labels) or a mask."""
    model.eval()
    images = Data.of(split).images
    out = []
    with torch.inference_mode():
        for start in range(0, len(split), chunk):
            result = model(preset.normalise(images[start:start + chunk]).contiguous(memory_format=torch.channels_last))
            if isinstance(result, tuple):
                out.extend(zip(*(r.numpy() for r in result)))
            else:
                out.extend(result.numpy())
    return out


def score(spec, model: torch.nn.Module, split: list[scenes.Scene], preset) -> dict:
    """`model`'s held-out figures on `split`, by its kind's metric (models/kinds.py)."""
    from models import kinds

    return kinds.get(spec.kind).score(predict(model, split, preset), split, len(spec.labels))


def initial_model(spec, seed: int) -> torch.nn.Module:
    """`spec`'s untrained model, its initial weights drawn from `seed`: with the recipe's own seeding in `fit`, a
    recipe trains the same model every time on a host."""
    from models import checkpoint

    torch.manual_seed(seed)
    return checkpoint.build_model(spec.builder, spec.builder_kwargs)


def train(spec, out: Path, *, epochs: int | None = None, recipe_name: str = "full") -> dict:
    """Train scene model `spec` (a registry entry whose builder's module also defines its `loss`) with its recipe;
    write its checkpoint to `out` and return the metrics, `gate` naming the figure min_accuracy bounds
    (models.train's interface). `epochs` cuts the recipe short (test runs)."""
    from models import checkpoint, kinds, registry
    from models.preprocessing import build_preset

    recipe = spec.recipe(recipe_name)
    recipe_name = recipe_name if recipe is not spec.train else "full"
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs, epoch_sizes=recipe.epoch_sizes[-epochs:])
    preset = build_preset(spec.preset)
    model = initial_model(spec, recipe.seed)
    loss = registry.resolve(spec.builder.partition(":")[0] + ":loss")
    test = scenes.cached("test", recipe.dataset_kwargs["test"], seed=recipe.dataset_kwargs.get("seed", 0))
    log = lambda line: print(f"{spec.name} ({recipe_name} recipe): {line}", flush=True)  # noqa: E731
    gate = kinds.get(spec.kind).headline
    metrics = fit(model, loss, recipe, preset, log=log, evaluate=lambda m: score(spec, m, test[:100], preset)[gate])
    started = time.monotonic()
    metrics.update(score(spec, model, test, preset), test_scenes=len(test), epochs=recipe.epochs, recipe=recipe_name,
                   eval_seconds=round(time.monotonic() - started, 1), gate=gate, min_accuracy=recipe.min_accuracy)
    checkpoint.save(model, spec, out, metrics=metrics)
    log(json.dumps(metrics))
    return metrics
