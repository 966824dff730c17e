"""Training on the shapes scenes (models/scenes.py), shared by the detector and the segmenter: one loop, each
architecture bringing its own loss (`loss(model, images, boxes, labels, masks)`) and scored by
models/scene_metrics.py.

    python -m models.scene_train --model detector --recipe quick --out build/scene-checkpoints/detector

Each step takes a batch of train scenes, each cut to a random square crop of the epoch's side (TrainSpec
epoch_sizes: a crop keeps every object at its own scale and costs a fraction of the whole scene), flipped and
turned by a multiple of 90 degrees; boxes and masks go through the same transform. Deterministic for a seed on
the CPU. Scored on the held-out scenes at their full size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models import scenes
from models.registry import TrainSpec

MEAN, STD = 0.5, 0.25  # per channel, on pixels scaled to [0, 1]
# Forward passes in bfloat16 (autocast; weights, gradients and the optimiser stay fp32) where the CPU multiplies
# bfloat16 matrices in hardware (AMX): twice the images a second for ResNet convolutions on this host, nothing for
# MobileNet's depthwise ones (docs/models.md). Elsewhere bfloat16 would be emulated and slower, so fp32.
BF16 = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> the float input the scene models take."""
    return (images.float() / 255 - MEAN) / STD


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


def batch(data: Data, index: list[int], side: int, generator: torch.Generator):
    """The scenes at `index`, each through its own random transform."""
    full = data.images.shape[-1]
    images, masks, boxes, labels = [], [], [], []
    for i in index:
        top, left = (torch.randint(0, full - side + 1, (2,), generator=generator).tolist() if side < full else (0, 0))
        flip, turns = bool(torch.randint(0, 2, (1,), generator=generator)), int(torch.randint(0, 4, (1,), generator=generator))
        image, mask, b, keep = transform(data.images[i], data.masks[i], data.boxes[i], top=top, left=left, side=side,
                                         flip=flip, turns=turns)
        images.append(image), masks.append(mask), boxes.append(b[keep]), labels.append(data.labels[i][keep])
    x = normalise(torch.stack(images)).contiguous(memory_format=torch.channels_last)
    return x, boxes, labels, torch.stack(masks)


def fit(model: torch.nn.Module, loss: Callable, recipe: TrainSpec, *, log: Callable[[str], None] = print,
        evaluate: Callable[[torch.nn.Module], dict] | None = None) -> dict:
    """Train `model` in place with `recipe` on `recipe.dataset_kwargs["train"]` scenes (seed recipe.seed); AdamW
    with a one-cycle schedule. Returns {"train_scenes", "steps", "train_seconds"}."""
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
    for epoch, side in enumerate(sides, 1):
        order = torch.randperm(len(data.masks), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            x, boxes, labels, masks = batch(data, order[step * recipe.batch_size:(step + 1) * recipe.batch_size].tolist(),
                                            side, generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
                value = loss(model, x, boxes, labels, masks)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            scheduler.step()
            total += value.item()
        progress = f"epoch {epoch}/{recipe.epochs} at {side} px  loss {total / steps_per_epoch:.4f}  {time.monotonic() - started:6.1f}s"
        if evaluate is not None and epoch % 8 == 0 and epoch < recipe.epochs:
            progress += f"  {evaluate(model)}"
            model.train()
        log(progress)
    model.eval()
    return {"train_scenes": len(data.masks), "steps": recipe.epochs * steps_per_epoch, "bf16_autocast": BF16,
            "train_seconds": round(time.monotonic() - started, 1)}


def predict(model: torch.nn.Module, split: list[scenes.Scene], *, chunk: int = 50) -> list:
    """The eval-mode model's outputs per scene (numpy), in order: (boxes, scores, labels) or a mask."""
    model.eval()
    images = Data.of(split).images
    out = []
    with torch.inference_mode():
        for start in range(0, len(split), chunk):
            result = model(normalise(images[start:start + chunk]).contiguous(memory_format=torch.channels_last))
            if isinstance(result, tuple):
                out.extend(zip(*(r.numpy() for r in result)))
            else:
                out.extend(result.numpy())
    return out


# Which loss and score each scene model has; the architectures live in models/detector.py and models/segmenter.py.
@dataclass(frozen=True)
class SceneModel:
    builder: str
    builder_kwargs: dict
    loss: str
    metric: str  # "detection" or "segmentation" (models/scene_metrics.py)
    gate: str  # the metric's figure the recipe's min_accuracy bounds
    recipes: dict


MODELS = {
    "detector": SceneModel(
        "models.detector:CenterNet", {"num_classes": 8, "max_detections": 32}, "models.detector:loss", "detection",
        "map_50",
        {"full": TrainSpec(epochs=64, batch_size=32, lr=2e-3, weight_decay=1e-4, seed=0, min_accuracy=0.9,
                           epoch_sizes=(96,) * 60 + (160,) * 4, dataset_kwargs={"train": 3000, "test": 300}),
         "quick": TrainSpec(epochs=3, batch_size=32, lr=2e-3, weight_decay=1e-4, seed=0, min_accuracy=0.0,
                            epoch_sizes=(96, 96, 160), dataset_kwargs={"train": 600, "test": 100})}),
    "segmenter": SceneModel(
        "models.segmenter:Segmenter", {"num_classes": 9, "backbone": "resnet18"}, "models.segmenter:loss",
        "segmentation", "miou",
        {"full": TrainSpec(epochs=32, batch_size=32, lr=2e-3, weight_decay=1e-4, seed=0, min_accuracy=0.85,
                           epoch_sizes=(96,) * 29 + (160,) * 3, dataset_kwargs={"train": 6000, "test": 300}),
         "quick": TrainSpec(epochs=3, batch_size=32, lr=2e-3, weight_decay=1e-4, seed=0, min_accuracy=0.0,
                            epoch_sizes=(96, 96, 160), dataset_kwargs={"train": 600, "test": 100})}),
}


def score(name: str, model: torch.nn.Module, split: list[scenes.Scene]) -> dict:
    """`model`'s held-out figures on `split` (models/scene_metrics.py)."""
    from models import scene_metrics

    entry = MODELS[name]
    if entry.metric == "detection":
        return scene_metrics.detection(predict(model, split), split)
    return scene_metrics.segmentation(predict(model, split), split, entry.builder_kwargs["num_classes"])


def train(name: str, out: Path, recipe_name: str = "full") -> dict:
    """Train scene model `name` with its recipe; write model.pt and metrics.json to `out`; return the metrics."""
    from models import registry

    entry = MODELS[name]
    recipe = entry.recipes[recipe_name]
    model = registry.resolve(entry.builder)(**entry.builder_kwargs)
    test = scenes.cached("test", recipe.dataset_kwargs["test"], seed=recipe.dataset_kwargs.get("seed", 0))
    log = lambda line: print(f"{name} ({recipe_name}): {line}", flush=True)  # noqa: E731
    metrics = fit(model, registry.resolve(entry.loss), recipe, log=log, evaluate=lambda m: score(name, m, test[:100]))
    started = time.monotonic()
    metrics.update(score(name, model, test), test_scenes=len(test), recipe=recipe_name,
                   eval_seconds=round(time.monotonic() - started, 1), recipe_spec=asdict(recipe))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    log(json.dumps({k: v for k, v in metrics.items() if k != "recipe_spec"}))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", choices=("full", "quick"), default="full")
    args = parser.parse_args(argv)
    metrics = train(args.model, args.out, args.recipe)
    entry = MODELS[args.model]
    bar = entry.recipes[args.recipe].min_accuracy
    if metrics[entry.gate] < bar:
        print(f"AccuracyError: {args.model} {entry.gate} {metrics[entry.gate]:.4f} < required {bar} "
              f"({args.recipe} recipe)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
