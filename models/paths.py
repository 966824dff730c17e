"""Where things live: the repository root, and the two build trees every step reads and writes.

The full tree (the repository root: checkpoints/, artifacts/, model_store/) holds what `make serve`, the
bench and the sweep use: models trained with the registry's full recipe. The quick tree (build/quick/) holds
what `make test` builds on a clean clone with the registry's short recipes. Keeping them apart means a
quick checkpoint is never served and a full one is never deleted to make room.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE_VARIABLE = "BUILD_TREE"  # set by make for the processes it starts: the root of the tree in use


@dataclass(frozen=True)
class Layout:
    """One build tree: checkpoints/<model>, artifacts/<model>, model_store/<model>.mar under `root`."""

    root: Path

    def checkpoint(self, model: str) -> Path:
        return self.root / "checkpoints" / model

    def artifacts(self, model: str) -> Path:
        return self.root / "artifacts" / model

    @property
    def model_store(self) -> Path:
        return self.root / "model_store"

    def archive(self, model: str) -> Path:
        return self.model_store / f"{model}.mar"


FULL = Layout(ROOT)
QUICK = Layout(ROOT / "build" / "quick")


def current() -> Layout:
    """The tree named by $BUILD_TREE (make sets it; `make test` points it at the quick tree), else the full one."""
    value = os.environ.get(TREE_VARIABLE)
    return Layout(Path(value).resolve()) if value else FULL


def model_config(model: str) -> Path:
    """The model-config YAML of `model` (TorchServe's batching and workers, and the handler's `handler:` section),
    which its archive packs."""
    return ROOT / "serve_config" / f"{model}.yaml"


def model_config_values(model: str) -> dict:
    """model_config(model), read."""
    import yaml

    return yaml.safe_load(model_config(model).read_text()) or {}
