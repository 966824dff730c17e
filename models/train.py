"""Train a registered model and write its self-describing checkpoint: `train` here for classifiers and tabular
models, or the trainer the registry entry names (models/scene_train.py for the scene models).

    python -m models.train --model digits --out checkpoints/digits

Deterministic for a given seed on the CPU. Exits non-zero if the held-out accuracy is below the
registry's `min_accuracy`, so a bad model never reaches export.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import checkpoint, registry
from models.progress import Eta
from models.preprocessing import build_preset


def preprocess_all(images: np.ndarray, preset) -> torch.Tensor:
    """Raw rows ((N, H, W) images, or (N, F) feature rows) -> model inputs through the preset the handler uses."""
    return torch.from_numpy(np.stack([preset.from_array(image) for image in images]))


def layout(batch: torch.Tensor) -> torch.Tensor:
    """Image batches in channels-last memory (faster convolutions on CPUs); other ranks as they are."""
    return batch.contiguous(memory_format=torch.channels_last) if batch.dim() == 4 else batch


def augment(batch: torch.Tensor, generator: torch.Generator, *, max_shift: float = 0.08, max_rotate: float = 0.15,
            max_scale: float = 0.1) -> torch.Tensor:
    """Small random affine jitter (shift, rotation, scale) so the model tolerates imperfect framing."""
    n = batch.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * max_rotate
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    background = batch.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(batch - background, grid, align_corners=False, padding_mode="zeros") + background


@torch.inference_mode()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, chunk: int = 256) -> float:
    model.eval()
    correct = sum(int((model(layout(images[i : i + chunk])).argmax(dim=1)
                       == labels[i : i + chunk]).sum())
                  for i in range(0, len(labels), chunk))
    return correct / len(labels)


def train(spec: registry.ModelSpec, out: Path, *, epochs: int | None = None, recipe_name: str = "full") -> dict:
    """Train `spec` from scratch with its `recipe_name` recipe, save the checkpoint to `out`, return its metrics.
    `epochs` cuts the recipe short (test runs)."""
    if spec.train is None or spec.dataset is None:
        raise SystemExit(f"{spec.name}: the registry entry has no training recipe; bring a checkpoint instead")
    recipe = spec.recipe(recipe_name)
    recipe_name = recipe_name if recipe is not spec.train else "full"  # no quick recipe: the full one ran
    epochs = epochs or recipe.epochs
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    started = time.monotonic()
    split = registry.resolve(spec.dataset)(**recipe.dataset_kwargs)
    preset = build_preset(spec.preset)
    train_x, test_x = preprocess_all(split.train_images, preset), preprocess_all(split.test_images, preset)
    train_y, test_y = torch.as_tensor(split.train_labels), torch.as_tensor(split.test_labels)
    print(f"{spec.name} ({recipe_name} recipe): {len(train_y)} train / {len(test_y)} test images, input "
          f"{tuple(train_x.shape[1:])}, data ready in {time.monotonic() - started:.1f}s", flush=True)
    full_size = tuple(train_x.shape[-2:]) if train_x.dim() == 4 else None

    model = checkpoint.build_model(spec.builder, spec.builder_kwargs).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-len(train_y) // recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=epochs * steps_per_epoch)
    test_acc = None
    sides = [recipe.epoch_sizes[e] if recipe.epoch_sizes else None for e in range(epochs)]
    eta = Eta([side * side if side else 1 if full_size is None else full_size[0] * full_size[1] for side in sides])
    for epoch in range(1, epochs + 1):
        side = recipe.epoch_sizes[epoch - 1] if recipe.epoch_sizes else None  # None: the full size
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        total_loss = 0.0
        for step, start in enumerate(range(0, len(order), recipe.batch_size), 1):
            idx = order[start : start + recipe.batch_size]
            batch = augment(train_x[idx], generator) if recipe.augment else train_x[idx]
            if side is not None and (side, side) != full_size:
                batch = F.interpolate(batch, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            logits = model(layout(batch))
            loss = F.cross_entropy(logits, train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            if step % 25 == 0:
                print(f"  epoch {epoch} step {step}/{steps_per_epoch}  loss {loss.item():.4f}  "
                      f"{time.monotonic() - started:6.1f}s", flush=True)
        # held-out accuracy is measured at the served size, so only after full-size epochs
        test_acc = accuracy(model, test_x, test_y) if side is None or (side, side) == full_size else None
        progress = f"test acc {test_acc:.4f}" if test_acc is not None else f"at {side} px"
        print(f"epoch {epoch:3d}/{epochs}  loss {total_loss / len(train_y):.4f}  {progress}  "
              f"{time.monotonic() - started:6.1f}s  {eta.epoch_done()}", flush=True)
    train_seconds = round(time.monotonic() - started, 1)
    metrics = {
        # the last epoch's figure when it ran at full size (the model has not changed since)
        "test_accuracy": round(test_acc if test_acc is not None else accuracy(model, test_x, test_y), 6),
        "train_accuracy": round(accuracy(model, train_x[:2000], train_y[:2000]), 6),  # up to 2,000 images
        "test_images": len(test_y),
        "train_images": len(train_y),
        "epochs": epochs,
        "recipe": recipe_name,
        "min_accuracy": recipe.min_accuracy,
        "train_seconds": train_seconds,
    }
    checkpoint.save(model, spec, out, metrics=metrics)
    print(f"{spec.name}: test accuracy {metrics['test_accuracy']:.4f}; checkpoint written to {out}", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a name from the registry")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--epochs", type=int, help="override the recipe's epoch count (short test runs)")
    parser.add_argument("--recipe", choices=("full", "quick"), default="full",
                        help="quick: the registry's short recipe, which `make test` uses when no checkpoint exists")
    parser.add_argument("--no-accuracy-gate", action="store_true", help="keep a checkpoint below min_accuracy")
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    if spec.pretrained is not None:  # nothing to train: import the checked pretrained weights
        try:
            registry.resolve(spec.pretrained)(spec, args.out)
        except RuntimeError as err:
            print(f"{type(err).__name__}: {err}", file=sys.stderr)
            return 1
        return 0
    metrics = registry.resolve(spec.trainer)(spec, args.out, epochs=args.epochs, recipe_name=args.recipe)
    gate = metrics.get("gate", "test_accuracy")  # the held-out figure the recipe's min_accuracy bounds
    if not args.no_accuracy_gate and metrics[gate] < metrics["min_accuracy"]:
        print(f"AccuracyError: {spec.name} held-out {gate.replace('_', ' ')} {metrics[gate]:.4f} < required "
              f"{metrics['min_accuracy']} ({args.recipe} recipe)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
