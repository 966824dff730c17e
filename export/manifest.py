"""The export manifest: what was exported, from which checkpoint and commit, how, and each file's sha256.
Verification, archiving and `make serve` read it; it is the single record of an export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
# File name per export format inside artifacts/<model>/.
ARTIFACT_FILES = {"trace": "model.trace.pt", "script": "model.script.pt", "onnx": "model.onnx",
                  "onnx_int8": "model.int8.onnx"}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make export MODEL=<name>` first")
    return json.loads(path.read_text())


class IntegrityError(RuntimeError):
    """An artifact's bytes differ from the sha256 recorded when it was exported."""


def check_integrity(directory: Path, manifest: dict[str, Any]) -> None:
    """Raise IntegrityError naming every artifact or asset whose sha256 no longer matches the manifest."""
    bad = []
    entries = [(fmt, entry["file"], entry["sha256"]) for fmt, entry in manifest["artifacts"].items()]
    entries += [("asset", name, digest) for name, digest in manifest.get("assets", {}).items()]
    for what, file, expected in entries:
        path = directory / file
        actual = sha256(path) if path.exists() else "missing"
        if actual != expected:
            bad.append(f"{path} ({what}): sha256 {actual} != manifest {expected}")
    if bad:
        raise IntegrityError("; ".join(bad))
