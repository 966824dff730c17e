"""The C++ runner (export/cpp/runner.cpp: libtorch, no Python) on a model's TorchScript and AOTInductor exports,
against the Python backends on the same batch: the same outputs, or the figures that say how they differ.

    python -m export.native --model digits --artifacts artifacts/digits --runner build/cpp/runner [--batch 4]

`make cpp-run MODEL=...` builds the runner with g++ against the torch wheel's libtorch and runs this.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export import manifest as mf
from models import registry

NATIVE_FORMATS = ("trace", "script", "aoti")  # what libtorch loads without Python
DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32"}


def parse(stdout: str) -> list[np.ndarray]:
    """The runner's printout: per output a line `output <i> <dtype> <d0>x<d1>...`, then one line of its values."""
    lines, outputs = stdout.splitlines(), []
    for header, values in zip(lines[0::2], lines[1::2]):
        _, _, dtype, shape = header.split()
        array = np.array(values.split(), dtype=np.float64 if dtype.startswith("float") else np.int64)
        outputs.append(array.astype(dtype).reshape([int(d) for d in shape.split("x")] if shape else []))
    return outputs


def run_native(runner: Path, artifact: Path, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    """The outputs the C++ runner prints for `inputs` (written as raw little-endian files beside each other)."""
    with tempfile.TemporaryDirectory(prefix="native-") as work:
        arguments = []
        for i, tensor in enumerate(inputs):
            path = Path(work) / f"input{i}.bin"
            tensor.contiguous().numpy().astype(tensor.numpy().dtype.newbyteorder("<")).tofile(path)
            arguments.append(f"{path}:{DTYPES[tensor.dtype]}:{'x'.join(str(d) for d in tensor.shape)}")
        proc = subprocess.run([str(runner), str(artifact), *arguments], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{runner} {artifact.name} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return parse(proc.stdout)


def compare(spec: registry.ModelSpec, artifacts: Path, runner: Path, *, batch: int = 4) -> dict[str, Any]:
    """Per native format of the export: the C++ and Python outputs on one seeded batch, and their largest
    difference (formats the export lacks are left out)."""
    from export.export import example_inputs
    from models.runtime import ThreadBudget, load_runner

    manifest = mf.read(artifacts)
    lengthy = any(axis > 0 for t in spec.inputs for axis in t.dynamic_axes)  # a dynamic length: 9 here
    inputs = list(example_inputs(spec, seed=11, shape=(batch, 9 if lengthy else None)))
    report = {}
    for fmt in (f for f in NATIVE_FORMATS if f in manifest["artifacts"]):
        artifact = artifacts / manifest["artifacts"][fmt]["file"]
        native = run_native(runner, artifact, inputs)
        python = load_runner(artifact, torch.device("cpu"), ThreadBudget())(inputs)
        same_layout = [(n.dtype, n.shape) for n in native] == [(p.dtype, p.shape) for p in python]
        report[fmt] = {"file": artifact.name, "native": native, "python": python, "same_layout": same_layout,
                       "max_abs_diff": max(float(np.abs(n.astype(np.float64) - p.astype(np.float64)).max())
                                           for n, p in zip(native, python)) if same_layout else float("inf")}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--runner", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    report = compare(spec, args.artifacts, args.runner, batch=args.batch)
    np.set_printoptions(precision=6, suppress=True, linewidth=120, threshold=12)
    failed = False
    for fmt, result in report.items():
        for name, native, python in zip(spec.outputs, result["native"], result["python"]):
            print(f"{spec.name} {fmt:6s} {name} {native.dtype}{list(native.shape)}\n  C++:    {native[0]}\n  Python: {python[0]}")
        print(f"{spec.name} {fmt:6s} C++ vs Python: max abs diff {result['max_abs_diff']:.3g}"
              f"{'' if result['same_layout'] else ' (dtypes or shapes differ)'}")
        failed |= not (result["same_layout"] and result["max_abs_diff"] <= 1e-5)
    if not report:
        print(f"{spec.name}: no format the C++ runner loads ({', '.join(NATIVE_FORMATS)}) in {args.artifacts}")
    return 1 if failed or not report else 0


if __name__ == "__main__":
    sys.exit(main())
