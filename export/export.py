"""Export a checkpoint to TorchScript (trace and script) and ONNX, and write the manifest.

    python -m export.export --model digits --checkpoint checkpoints/digits --out artifacts/digits

Export only writes artifacts; `export.verify` is the separate step that checks them against eager.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from export import manifest as mf
from models import checkpoint, registry


def example_inputs(spec: registry.ModelSpec, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tensors of each input's example shape (batch >= 2 keeps the batch axis dynamic in ONNX)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for tensor_spec in spec.inputs:
        if tensor_spec.example_shape[0] < 2:
            raise ValueError(f"{spec.name}: input {tensor_spec.name!r} example batch must be >= 2 to stay dynamic")
        tensors.append(torch.randn(tensor_spec.example_shape, generator=generator, dtype=getattr(torch, tensor_spec.dtype)))
    return tuple(tensors)


def export_trace(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream but still what TorchServe loads
        traced = torch.jit.trace(model, example_inputs(spec), check_trace=True)
    traced.save(str(path))
    return {"exporter": "torch.jit.trace", "format": "torchscript"}


def export_script(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    scripted.save(str(path))
    return {"exporter": "torch.jit.script", "format": "torchscript"}


def export_onnx(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    """ONNX through the dynamo-based exporter (torch.export), named explicitly, with dynamic axes from the registry."""
    # Positional (one entry per input), so it holds whatever the model's forward() names its arguments.
    dynamic_shapes = tuple(
        {axis: torch.export.Dim(label if label == "batch" else f"{t.name}_{label}", min=1, max=4096)
         for axis, label in t.dynamic_axes.items()}
        for t in spec.inputs
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            example_inputs(spec),
            dynamo=True,
            opset_version=spec.onnx_opset,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    return {"exporter": "torch.onnx.export(dynamo=True)", "format": "onnx", "opset": spec.onnx_opset}


EXPORTERS: dict[str, Callable[[nn.Module, registry.ModelSpec, Path], dict[str, Any]]] = {
    "trace": export_trace,
    "script": export_script,
    "onnx": export_onnx,
}


def export(spec: registry.ModelSpec, checkpoint_dir: Path, out: Path) -> dict[str, Any]:
    """Export every format in spec.formats from the checkpoint; return the manifest written to `out`."""
    model, meta = checkpoint.load(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for fmt in spec.formats:
        path = out / mf.ARTIFACT_FILES[fmt]
        started = time.monotonic()
        info = EXPORTERS[fmt](model, spec, path)
        artifacts[fmt] = {"file": path.name, **info, "sha256": mf.sha256(path), "bytes": path.stat().st_size}
        print(f"{spec.name}: exported {fmt:6s} -> {path} ({path.stat().st_size / 1e3:.0f} kB, "
              f"{time.monotonic() - started:.1f}s)", flush=True)
    manifest = {
        "model": spec.name,
        "commit": checkpoint.git_commit(),
        "checkpoint": {"dir": str(checkpoint_dir), "sha256": mf.sha256(checkpoint_dir / checkpoint.WEIGHTS),
                       "commit": meta.get("commit"), "metrics": meta.get("metrics", {})},
        "torch": torch.__version__,
        "preset": meta["preset"],
        "labels": meta["labels"],
        "inputs": [{"name": t.name, "dtype": t.dtype, "example_shape": list(t.example_shape),
                    "dynamic_axes": {str(k): v for k, v in t.dynamic_axes.items()}} for t in spec.inputs],
        "outputs": list(spec.outputs),
        "artifacts": artifacts,
    }
    mf.write(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    export(registry.get(args.model), args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
