"""Self-describing checkpoints: `model.pt` (a plain state_dict, loadable with weights_only=True)
beside `model.json` (builder, its arguments, preset, labels, metrics, commit). Anything downstream
rebuilds the model from the checkpoint folder alone."""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.registry import ModelSpec, resolve

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


def load(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from `directory` in eval mode; weights are loaded with weights_only=True."""
    meta = json.loads((directory / META).read_text())
    model = build_model(meta["builder"], meta["builder_kwargs"])
    model.load_state_dict(torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval(), meta
