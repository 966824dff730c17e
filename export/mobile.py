"""ExecuTorch for devices: an image model lowered to a `.pte` with the XNNPACK backend, checked in a fresh process
with ExecuTorch's own runtime against the eager model, with its size and latency.

    python -m export.mobile --model digits --checkpoint checkpoints/digits --out mobile/digits

The program is exported with a dynamic batch whose example is the largest batch the model is served with (the
model-config YAML's batchSize): ExecuTorch plans its memory for the example's shapes, so a smaller batch fits and a
larger one would not. The report (`mobile.json` beside `model.pte`) holds the parity figures over batch sizes,
top-1 agreement on the held-out split, the file's size and the median latency per batch size on one thread.
Exit 1 when the `.pte` misses the registry's tolerance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from models import checkpoint, kinds, registry
from models.paths import ROOT, model_config_values

PTE = "model.pte"
REPORT = "mobile.json"


def served_batch(spec: registry.ModelSpec) -> int:
    """The largest batch the model is served with (its model-config YAML's batchSize)."""
    config = model_config_values(spec.name)
    return int(config.get("batchSize", 1))


def lower(spec: registry.ModelSpec, checkpoint_dir: Path, out: Path) -> dict[str, Any]:
    """torch.export (dynamic batch, example at the served batch), then to_edge_transform_and_lower with the
    XNNPACK partitioner, then to_executorch; write the .pte and return what was done."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if not kinds.get(spec.kind).lowers:
        raise ValueError(f"{spec.name} is a {spec.kind} model: `make mobile` lowers the kinds that declare it "
                         f"({', '.join(k.name for k in kinds.KINDS.values() if k.lowers)}; models/kinds.py)")
    model, _ = checkpoint.load(checkpoint_dir, spec)
    batch = max(2, served_batch(spec))  # 2 at least: a batch of 1 would be specialised away
    example = torch.randn((batch, *spec.inputs[0].example_shape[1:]), generator=torch.Generator().manual_seed(0))
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The bound is one over the example: with the two equal, ExecuTorch 1.5.1 plans the XNNPACK delegate's output
        # as a static tensor and any smaller batch fails ("Attempted to resize a static tensor"). Memory is planned
        # for the example, so batches 1 to `batch` run.
        bound = torch.export.Dim("batch", min=1, max=batch + 1)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: bound},), strict=False)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.mkdir(parents=True, exist_ok=True)
    (out / PTE).write_bytes(lowered.buffer)
    return {"model": spec.name, "file": PTE, "bytes": (out / PTE).stat().st_size, "max_batch": batch,
            "backend": "XnnpackPartitioner", "lower_seconds": round(time.monotonic() - started, 1),
            "torch": torch.__version__}


def check(spec: registry.ModelSpec, checkpoint_dir: Path, pte: Path, max_batch: int) -> dict[str, Any]:
    """In the fresh process: the .pte through ExecuTorch's runtime against eager, on held-out images at batch sizes
    up to `max_batch` and on random inputs; top-1 agreement on the whole held-out split; latency on one thread."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(1)  # before the program is loaded: its XNNPACK delegate takes the pool as it is then
    from executorch.runtime import Runtime

    from export.verify import compare, held_out_inputs

    method = Runtime.get().load_program(pte).load_method("forward")
    model, _ = checkpoint.load(checkpoint_dir, spec)
    images, _labels = held_out_inputs(spec)
    generator = torch.Generator().manual_seed(1)

    def run(batch: torch.Tensor) -> torch.Tensor:
        return method.execute([batch.contiguous()])[0]

    checks, latency = [], {}
    sizes = sorted({1, 2, max(1, max_batch // 2), max_batch})
    for batch in sizes:
        for source, inputs in (("real", images[:batch]),
                               ("random", torch.randn((batch, *images.shape[1:]), generator=generator))):
            with torch.inference_mode():
                expected = model(inputs)
            checks.append(compare(spec.outputs[0], expected, run(inputs), inputs=source, batch=batch))
        timings = []
        for _ in range(3):
            run(images[:batch])
        for _ in range(20):
            started = time.perf_counter()
            run(images[:batch])
            timings.append((time.perf_counter() - started) * 1e3)
        latency[str(batch)] = round(statistics.median(timings), 3)
    agree = 0
    for start in range(0, len(images), max_batch):
        chunk = images[start : start + max_batch]
        with torch.inference_mode():
            agree += (run(chunk).argmax(1) == model(chunk).argmax(1)).sum().item()
    return {"checks": checks, "top1_agreement": agree / len(images), "held_out": len(images),
            "latency_ms": latency, "threads": 1}


def verify(spec: registry.ModelSpec, checkpoint_dir: Path, out: Path, lowered: dict[str, Any]) -> tuple[dict, list[str]]:
    """check() in a new interpreter; the report and every way it misses the registry's tolerance."""
    proc = subprocess.run([sys.executable, "-m", "export.mobile", "--model", spec.name, "--checkpoint",
                           str(checkpoint_dir), "--out", str(out), "--worker", str(lowered["max_batch"])],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {}, [f"{out / PTE} could not be loaded or run by ExecuTorch's runtime:\n{proc.stderr.strip()[-2000:]}"]
    from export.verify import judge

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Judged as every export is: the registry's tolerance (a .pte has no format tolerance of its own).
    return result, judge(spec, "pte", {"artifact": PTE, **result})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: the fresh process, max batch
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    if args.worker:
        result = check(spec, args.checkpoint, args.out / PTE, args.worker)
        for c in result["checks"]:
            c.pop("cosines", None)
        print(json.dumps(result))
        return 0
    lowered = lower(spec, args.checkpoint, args.out)
    print(f"{spec.name}: lowered to {args.out / PTE} ({lowered['bytes'] / 1e3:.0f} kB, XNNPACK, batch 1 to "
          f"{lowered['max_batch']}, {lowered['lower_seconds']} s)", flush=True)
    result, failures = verify(spec, args.checkpoint, args.out, lowered)
    if failures:
        print(f"{spec.name}: the .pte fails verification:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    worst = max(result["checks"], key=lambda c: c["max_abs_diff"])
    (args.out / REPORT).write_text(json.dumps({**lowered, **result}, indent=1) + "\n")
    print(f"{spec.name}: ExecuTorch runtime vs eager: max abs diff {worst['max_abs_diff']:.3g} (atol {spec.tolerance.atol:g},"
          f" worst at batch {worst['batch']} {worst['inputs']}), top-1 agreement {result['top1_agreement']:.4f} over "
          f"{result['held_out']} held-out images")
    print(f"{spec.name}: {lowered['bytes'] / 1e3:.0f} kB; median latency on one thread: " +
          ", ".join(f"batch {b} {ms:.2f} ms" for b, ms in result["latency_ms"].items()) + f"; report {args.out / REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
