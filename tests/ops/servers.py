"""Helpers for the ops tier's private servers: a model store and a config with overrides."""

from __future__ import annotations

import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from serve_config import control as ts
from tests.conftest import TREE, built


def template_with(tmp_path: Path, **overrides) -> Path:
    """The checked-in config.properties with some settings replaced (a test's own server only)."""
    text = ts.TEMPLATE.read_text()
    for key, value in overrides.items():
        text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        assert count == 1, key
    path = tmp_path / "config.properties"
    path.write_text(text)
    return path


def store_with(tmp_path: Path, *models: str) -> Path:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    for model in models:
        for suffix in (".mar", ".mar.sha256"):
            shutil.copy2(built(TREE.model_store / f"{model}{suffix}"), store / f"{model}{suffix}")
    return store


@contextmanager
def serving(root: Path, model: str) -> Iterator[tuple[ts.Server, Path]]:
    """`model` served from a store of its own under `root` (a test may rebuild or rewrite it); stopped by PID."""
    store = store_with(root, model)
    server = ts.start(root / "run", [model], ports=ts.Ports.free(), model_store=store)
    try:
        yield server, store
    finally:
        ts.stop(root / "run")


def frontend_pid(server: ts.Server) -> int:
    """The PID of the server's JVM (TorchServe's frontend), under the supervisor that leads its process group."""
    import psutil

    javas = [p.pid for p in psutil.Process(server.pid()).children(recursive=True) if p.name() == "java"]
    assert len(javas) == 1, javas
    return javas[0]
