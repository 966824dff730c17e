"""Export a checkpoint to TorchScript (trace and script), ONNX, torch.export and AOTInductor; write the manifest.

    python -m export.export --model digits --checkpoint checkpoints/digits --out artifacts/digits

Export only writes artifacts; `export.verify` is the separate step that checks them against eager.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from export import manifest as mf
from models import checkpoint, registry


def random_inputs(spec: registry.ModelSpec, batch: int, generator: torch.Generator,
                  length: int | None = None) -> list[torch.Tensor]:
    """Seeded random tensors of the input spec, `batch` rows (and every dynamic non-batch axis at `length`, when
    given): normal floats, integers in [0, 10), booleans. A model whose inputs must hold other values (token
    ids of a vocabulary) names its own registry `example_inputs` function."""
    tensors = []
    for t in spec.inputs:
        shape = [batch] + [length if length is not None and axis in t.dynamic_axes else size
                           for axis, size in enumerate(t.example_shape) if axis > 0]
        dtype = getattr(torch, t.dtype)
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            tensors.append(torch.randint(0, 10, shape, generator=generator).to(dtype))
    return tensors


def example_inputs(spec: registry.ModelSpec, *, seed: int = 0, shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """Example tensors of the input spec (batch >= 2 keeps the batch axis dynamic in ONNX): the registry's
    `example_inputs` function for inputs random values cannot stand for (token ids), else seeded random ones.
    `shape` gives (batch, length) instead of the example shape."""
    if any(t.example_shape[0] < 2 for t in spec.inputs):
        raise ValueError(f"{spec.name}: every input's example batch must be >= 2 to stay dynamic")
    if spec.example_inputs is not None:
        batch, length = shape or spec.inputs[0].example_shape[:2]
        return tuple(registry.resolve(spec.example_inputs)(batch, length, seed=seed))
    batch, length = shape or (spec.inputs[0].example_shape[0], None)
    return tuple(random_inputs(spec, batch, torch.Generator().manual_seed(seed), length))


def input_records(spec: registry.ModelSpec) -> list[dict[str, Any]]:
    """The manifest's record of each input (name, dtype, example shape, dynamic axes and, where the entry declares
    one, the range of its values), which the handlers read."""
    return [{"name": t.name, "dtype": t.dtype, "example_shape": list(t.example_shape),
             "dynamic_axes": {str(k): v for k, v in t.dynamic_axes.items()},
             **({"value_range": list(t.value_range)} if t.value_range is not None else {})} for t in spec.inputs]


def describe_outputs(model: nn.Module, spec: registry.ModelSpec) -> list[dict[str, Any]]:
    """Each output's name, dtype and shape, -1 on the axes that follow the inputs' dynamic axes: the eager model
    run on two examples whose dynamic axes differ (batch 2 and 3, dynamic lengths 2 and 3)."""
    shapes = []
    for batch, length in ((2, 2), (3, 3)):
        with torch.inference_mode():
            out = model(*example_inputs(spec, seed=7, shape=(batch, length)))
        shapes.append([(o.dtype, tuple(o.shape)) for o in (out if isinstance(out, (tuple, list)) else [out])])
    return [{"name": name, "dtype": str(dtype).removeprefix("torch."),
             "shape": [size if size == other else -1 for size, other in zip(shape, other_shape)]}
            for name, (dtype, shape), (_, other_shape) in zip(spec.outputs, *shapes, strict=True)]


def export_trace(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    """torch.jit.trace on the example, checked against eager on the registry's other shapes too (a trace
    records one path through Python control flow; another sequence length or padding must give the same)."""
    checks = [example_inputs(spec, seed=1 + i, shape=shape) for i, shape in enumerate(spec.check_shapes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream but still what TorchServe loads
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # divergence is caught by check_inputs instead
        traced = torch.jit.trace(model, example_inputs(spec), check_trace=True, check_inputs=checks or None,
                                 check_tolerance=1e-5)
    traced.save(str(path))
    return {"exporter": "torch.jit.trace", "format": "torchscript",
            "checked_shapes": [list(shape) for shape in spec.check_shapes]}


def export_script(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    scripted.save(str(path))
    return {"exporter": "torch.jit.script", "format": "torchscript"}


def dynamic_shapes(spec: registry.ModelSpec, *, derive_others: bool = False) -> tuple[dict[int, Any], ...]:
    """torch.export's dynamic shapes for the registry's dynamic axes: positional (one entry per input, so it holds
    whatever the model's forward() names its arguments), one shared Dim for the batch (1 to 4096). Other axes get
    a Dim per input, or with `derive_others` Dim.AUTO: torch.export then finds their range and relations itself
    (a BERT's sequence is at most its 512 positions, and its ids and mask share one length)."""
    def dim(t: registry.TensorSpec, label: str):
        if label != "batch" and derive_others:
            return torch.export.Dim.AUTO
        return torch.export.Dim(label if label == "batch" else f"{t.name}_{label}", min=1, max=4096)

    return tuple({axis: dim(t, label) for axis, label in t.dynamic_axes.items()} for t in spec.inputs)


def export_onnx(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    """ONNX through the dynamo-based exporter (torch.export), named explicitly, with dynamic axes from the registry."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            example_inputs(spec),
            dynamo=True,
            opset_version=spec.onnx_opset,
            input_names=[t.name for t in spec.inputs],
            output_names=list(spec.outputs),
            dynamic_shapes=dynamic_shapes(spec),
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    return {"exporter": "torch.onnx.export(dynamo=True)", "format": "onnx", "opset": spec.onnx_opset}


def int8_exclusions(model_proto) -> list[str]:
    """MatMul nodes left in fp32 by the INT8 variant: those with no constant weight (attention's
    activation x activation products, whose ranges change per batch) and the down projections, weight
    (k, n) with k > n (the FFN's GELU output carries the activation outliers that per-tensor uint8 cannot
    hold). Measured on minilm: quantising them too costs 0.03 of worst-case cosine for 15 % more speed."""
    from onnx import numpy_helper

    shapes = {init.name: numpy_helper.to_array(init).shape for init in model_proto.graph.initializer}
    excluded = []
    for node in model_proto.graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [shapes[i] for i in node.input if i in shapes]
        if not weights or (len(weights[0]) == 2 and weights[0][0] > weights[0][1]):
            excluded.append(node.name)
    return excluded


def export_onnx_int8(model: nn.Module, spec: registry.ModelSpec, path: Path, *, meta: dict[str, Any]) -> dict[str, Any]:
    """INT8 for CPU serving, from the fp32 ONNX export, as the registry's `quantization` says: dynamic (transformers)
    or static QDQ calibrated on the training split (CNNs)."""
    import logging

    source = path.parent / mf.ARTIFACT_FILES["onnx"]
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: onnx_int8 quantises the onnx export (list onnx first)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ONNX Runtime's quantisation logs advice at WARNING on the root logger
    try:
        if spec.quantization == "static":
            return quantize_static_qdq(spec, source, path, meta)
        return quantize_dynamic_matmuls(source, path)
    finally:
        root.setLevel(level)


def quantize_dynamic_matmuls(source: Path, path: Path) -> dict[str, Any]:
    """ONNX Runtime dynamic quantization (MatMul weights int8 per output channel, activations quantised per batch
    at run time), minus int8_exclusions."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    excluded = int8_exclusions(onnx.load(str(source), load_external_data=False))
    quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded)
    return {"exporter": "onnxruntime.quantization.quantize_dynamic(QInt8, per_channel, MatMul)", "format": "onnx",
            "from": source.name, "fp32_matmuls": len(excluded)}


CALIBRATION_IMAGES = 256  # seeded draw from the training split; MinMax ranges settle well before that


def calibration_batches(spec: registry.ModelSpec, meta: dict[str, Any], *, count: int = CALIBRATION_IMAGES,
                        batch: int = 16) -> list[dict[str, Any]]:
    """Feeds for static calibration: `count` images drawn (seeded) from the training split of the recipe the
    checkpoint was trained with (the full recipe's for a checkpoint that records none), through the model's preset,
    in batches named by the model's input."""
    import numpy as np

    from models.preprocessing import build_preset

    if spec.train is None:
        raise ValueError(f"{spec.name}: static INT8 calibrates on the training split of the model's recipe, and the "
                         "entry has none (set quantization='dynamic')")
    recipe = meta.get("metrics", {}).get("recipe") or "full"
    split = registry.resolve(spec.dataset)(**spec.recipe(recipe).dataset_kwargs)
    preset = build_preset(spec.preset)
    chosen = np.random.default_rng(0).choice(len(split.train_images), min(count, len(split.train_images)), replace=False)
    images = np.stack([preset.from_array(split.train_images[i]) for i in sorted(chosen)])
    return [{spec.inputs[0].name: images[i : i + batch]} for i in range(0, len(images), batch)]


def quantize_static_qdq(spec: registry.ModelSpec, source: Path, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime static quantization in QDQ form: int8 weights per output channel, uint8 activations whose
    ranges (MinMax) come from calibration_batches; the last Conv/Gemm/MatMul (the classifier head: cheap, and
    where rounding flips the most top-1 answers) stays fp32. Measured on the quick shapes model: head kept fp32,
    top-1 agreement 0.991 and 0.2 points of accuracy lost; head quantised too, 0.978 and 0.6; first conv kept
    fp32 instead, 0.974 and 0.8 points, and a third of the speed-up gone.

    Weights use 7 of their 8 bits (`reduce_range`): on an x86 CPU without VNNI (AVX2 alone, as an AMD EPYC host
    here), ONNX Runtime's uint8 x int8 kernels sum pairs of products in 16 bits, which saturate; with 8-bit
    weights the quick digits model lost 0.83 points of held-out accuracy there (0.9889 against eager's 0.9972,
    over the 0.5 allowed), with 7-bit weights none (0.9972, top-1 agreement 1.0)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    feeds = calibration_batches(spec, meta)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pending = iter(feeds)

        def get_next(self):
            return next(self.pending, None)

    graph = onnx.load(str(source), load_external_data=False).graph
    weighted = [node.name for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=weighted[-1:], reduce_range=True)
    return {"exporter": "onnxruntime.quantization.quantize_static(QDQ, QInt8 per-channel weights in 7 bits, "
                        "QUInt8 activations, MinMax)", "format": "onnx", "from": source.name,
            "calibration": {"images": sum(len(f[spec.inputs[0].name]) for f in feeds), "split": "train",
                            "recipe": meta.get("metrics", {}).get("recipe") or "full"},
            "fp32_nodes": weighted[-1:]}


def export_program(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    """A torch.export ExportedProgram (non-strict: traced through Python, guarded on the dynamic axes), saved with
    torch.export.save; the successor of TorchScript, and what AOTInductor and ExecuTorch start from."""
    program = torch.export.export(model, example_inputs(spec), dynamic_shapes=dynamic_shapes(spec, derive_others=True),
                                  strict=False)
    torch.export.save(program, str(path))
    return {"exporter": "torch.export.export(strict=False)", "format": "pt2",
            "ranges": {str(symbol): [_bound(r.lower), _bound(r.upper)] for symbol, r in program.range_constraints.items()}}


def _bound(value) -> int | None:
    """A symbolic size's bound as JSON: an int, or None where it is unbounded."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):  # int(int_oo) fails inside sympy
        return None


def export_aoti(model: nn.Module, spec: registry.ModelSpec, path: Path) -> dict[str, Any]:
    """AOTInductor: the program export compiled ahead of time into a package of native code for this host (its CPU's
    instruction set and this torch), or for its GPU when it has one (the program is exported again on the device).
    The manifest records what it was built for; models.runtime refuses to load it anywhere else."""
    from torch._inductor import aoti_compile_and_package

    from models.runtime import aoti_build_host, quiet_cpp_extension

    source = path.parent / mf.ARTIFACT_FILES["program"]
    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: aoti compiles the program export (list program first)")
    if torch.cuda.is_available():  # a CUDA package: weights and example inputs on the device
        device = torch.device("cuda", 0)
        on_device = tuple(t.to(device) for t in example_inputs(spec))
        program = torch.export.export(model.to(device), on_device, dynamic_shapes=dynamic_shapes(spec, derive_others=True),
                                      strict=False)
        model.to("cpu")
    else:
        device, program = torch.device("cpu"), torch.export.load(str(source))
    with quiet_cpp_extension():
        aoti_compile_and_package(program, package_path=str(path))
    return {"exporter": "torch._inductor.aoti_compile_and_package", "format": "pt2-aoti",
            "from": source.name, "built_for": aoti_build_host(device)}


EXPORTERS: dict[str, Callable[[nn.Module, registry.ModelSpec, Path], dict[str, Any]]] = {
    "trace": export_trace,
    "script": export_script,
    "onnx": export_onnx,
    "onnx_int8": export_onnx_int8,
    "program": export_program,
    "aoti": export_aoti,
}


def export(spec: registry.ModelSpec, checkpoint_dir: Path, out: Path) -> dict[str, Any]:
    """Export every format in spec.formats from the checkpoint; return the manifest written to `out`."""
    model, meta = checkpoint.load(checkpoint_dir, spec)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = {}
    for fmt in spec.formats:
        path = out / mf.ARTIFACT_FILES[fmt]
        started = time.monotonic()
        info = EXPORTERS[fmt](model, spec, path, **({"meta": meta} if fmt == "onnx_int8" else {}))
        artifacts[fmt] = {"file": path.name, **info, "sha256": mf.sha256(path), "bytes": path.stat().st_size}
        print(f"{spec.name}: exported {fmt:9s} -> {path} ({path.stat().st_size / 1e3:.0f} kB, "
              f"{time.monotonic() - started:.1f}s)", flush=True)
    for fmt, reason in spec.not_applicable.items():
        print(f"{spec.name}: {fmt:9s} not applicable: {reason}", flush=True)
    assets = {}
    for name in spec.assets:
        shutil.copy2(checkpoint_dir / name, out / name)
        assets[name] = mf.sha256(out / name)
    manifest = {
        "model": spec.name,
        "kind": spec.kind,
        "commit": checkpoint.git_commit(),
        "checkpoint": {"dir": str(checkpoint_dir), "sha256": mf.sha256(checkpoint_dir / checkpoint.WEIGHTS),
                       "commit": meta.get("commit"), "metrics": meta.get("metrics", {})},
        "torch": torch.__version__,
        "preset": meta["preset"],
        "labels": meta["labels"],
        "inputs": input_records(spec),
        "outputs": list(spec.outputs),
        "output_specs": describe_outputs(model, spec),
        "artifacts": artifacts,
        "not_applicable": dict(spec.not_applicable),
        "assets": assets,
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
