"""The compute limit: in-process throughput of a model per backend and batch size, no server involved.

    python -m loadtest.compute --model digits --threads 1 --out compute.json [--seconds 1.0]

Runs in its own process with the thread budget a TorchServe worker of this model gets (set the way the
handler sets it, through handlers.runtime.ThreadBudget), on the worker's device policy, after
warm-up. Backends: the eager model from the checkpoint and every exported artifact, each through the
same runner class the handler uses. Inputs are random tensors of the registry's input spec.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from export import manifest as mf
from export.verify import reference_inputs
from handlers.runtime import ThreadBudget, load_runner, select_device
from models import checkpoint, registry

ROOT = Path(__file__).resolve().parent.parent
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def eager_runner(checkpoint_dir: Path, device: torch.device) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    model, _ = checkpoint.load(checkpoint_dir)
    model = model.to(device)

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = model(*[t.to(device) for t in inputs])
        return [o.cpu() for o in (out if isinstance(out, (tuple, list)) else [out])]

    return run


def samples_per_second(run: Callable, inputs: list[torch.Tensor], batch: int, *, seconds: float) -> float:
    """Warm up, then call `run` until `seconds` have passed (at least 3 calls); return samples/s."""
    for _ in range(3):
        run(inputs)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        run(inputs)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def measure(spec: registry.ModelSpec, checkpoint_dir: Path, artifacts: Path, *, threads: int,
            batch_sizes: Sequence[int], seconds: float, gpu_id: int | None = None) -> dict:
    budget = ThreadBudget(intra_op=threads)
    budget.apply_to_torch()
    device = select_device(gpu_id)
    manifest = mf.read(artifacts)
    runners = {"eager": eager_runner(checkpoint_dir, device)}
    for fmt in spec.formats:
        runners[fmt] = load_runner(artifacts / manifest["artifacts"][fmt]["file"], device, budget)
    table: dict[str, dict[int, float]] = {}
    for backend, run in runners.items():
        table[backend] = {}
        for batch in batch_sizes:
            inputs = reference_inputs(spec, batch, "random", None)
            table[backend][batch] = samples_per_second(run, inputs, batch, seconds=seconds)
            print(f"  {backend:<7} batch {batch:>3}: {table[backend][batch]:10.1f} samples/s", flush=True)
    best_backend, best_batch = max(((b, n) for b in table for n in table[b]), key=lambda bn: table[bn[0]][bn[1]])
    return {"threads": threads, "device": str(device), "seconds_per_point": seconds,
            "samples_per_s": {b: {str(n): v for n, v in row.items()} for b, row in table.items()},
            "best": {"backend": best_backend, "batch": best_batch, "samples_per_s": table[best_backend][best_batch]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True, help="intra-op threads of one worker")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--seconds", type=float, default=1.0, help="measured time per backend and batch size")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    result = measure(spec, ROOT / "checkpoints" / spec.name, ROOT / "artifacts" / spec.name, threads=args.threads,
                     batch_sizes=args.batch_sizes, seconds=args.seconds)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
