"""Self-describing checkpoints: `model.pt` (a plain state_dict, loadable with weights_only=True)
beside `model.json` (model, builder, its arguments, preset, labels, metrics, commit). Anything downstream
rebuilds the model from the checkpoint folder alone, and only as the architecture its registry entry names: a
`model.json` is data from wherever the checkpoint came from, and its "builder" is a callable to import and call,
so a builder other than the entry's is refused, never run (CheckpointError)."""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import ModelSpec, get, resolve

WEIGHTS, META = "model.pt", "model.json"


def git_commit(cwd: Path | None = None) -> str:
    """The commit the working tree is at, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty.strip() else "")


def build_model(builder: str, builder_kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate `builder` ('module:callable') with its keyword arguments."""
    return resolve(builder)(**builder_kwargs)


def save(model: nn.Module, spec: ModelSpec, directory: Path, *, metrics: dict[str, Any],
         builder_kwargs: dict[str, Any] | None = None) -> Path:
    """Write weights and metadata for `model` (an instance of spec.builder, built with `builder_kwargs`,
    by default the registry's) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / WEIGHTS)
    meta = {
        "model": spec.name,
        "builder": spec.builder,
        "builder_kwargs": spec.builder_kwargs if builder_kwargs is None else builder_kwargs,
        "preset": spec.preset,
        "labels": list(spec.labels),
        "metrics": metrics,
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory / WEIGHTS


class CheckpointError(ValueError):
    """A checkpoint that may not be rebuilt: it names no registered model, or another architecture than its entry."""


def load(directory: Path, spec: ModelSpec | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from `directory` in eval mode; weights are loaded with weights_only=True. The checkpoint
    must have been made by the builder of `spec` (by default the registry entry its "model" names)."""
    meta = json.loads((directory / META).read_text())
    if spec is None:
        try:
            spec = get(meta.get("model"))
        except (KeyError, TypeError):
            raise CheckpointError(f"{directory / META} names model {meta.get('model')!r}, which is not registered: "
                                  "add its registry entry (models/registry.py) first") from None
    if meta.get("model") != spec.name:
        raise CheckpointError(f"{directory / META} is a checkpoint of {meta.get('model')!r}, not of {spec.name!r}")
    if meta.get("builder") != spec.builder or not isinstance(meta.get("builder_kwargs"), dict):
        raise CheckpointError(f"{directory / META} asks for builder {meta.get('builder')!r}, but registry entry "
                              f"{spec.name!r} builds {spec.builder!r}: a checkpoint rebuilds only its entry's "
                              "architecture; retrain it, or correct the entry")
    model = build_model(meta["builder"], meta["builder_kwargs"])
    model.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval(), meta
