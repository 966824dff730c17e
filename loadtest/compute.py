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
        run(inputs)  # runners return CPU tensors, so each call includes its device synchronisation
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def preprocess_cost(spec: registry.ModelSpec, *, count: int = 32, rounds: int = 3) -> dict:
    """Mean milliseconds to turn one real payload into its model input (decode, convert, resize, normalise),
    on one thread as the handler does it, over `count` payloads of the bench's mix; and the same without
    reduced-size JPEG decoding, to show what that saves."""
    from loadtest.payloads import payloads
    from models.preprocessing import build_preset, decode_for, decode_image

    preset = build_preset(spec.preset)
    bodies = [p.body for p in payloads(spec.name, count)]
    limit = 10**9

    def mean_ms(step: Callable[[bytes], torch.Tensor]) -> float:
        for body in bodies:
            step(body)
        start = time.perf_counter()
        for _ in range(rounds):
            for body in bodies:
                step(body)
        return (time.perf_counter() - start) * 1000 / (rounds * len(bodies))

    with_draft = mean_ms(lambda b: preset(decode_for(preset, b, max_pixels=limit)))
    without = mean_ms(lambda b: preset(decode_image(b, max_pixels=limit)))
    print(f"  preprocess: {with_draft:.2f} ms/image ({without:.2f} ms without reduced-size JPEG decoding)", flush=True)
    return {"ms_per_image": with_draft, "ms_per_image_full_decode": without, "payloads": len(bodies)}


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
    preprocess = preprocess_cost(spec)
    best_backend, best_batch = max(((b, n) for b in table for n in table[b]), key=lambda bn: table[bn[0]][bn[1]])
    return {"threads": threads, "device": str(device), "seconds_per_point": seconds, "preprocess": preprocess,
            "samples_per_s": {b: {str(n): v for n, v in row.items()} for b, row in table.items()},
            "best": {"backend": best_backend, "batch": best_batch, "samples_per_s": table[best_backend][best_batch]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, required=True, help="intra-op threads of one worker")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--seconds", type=float, default=1.0, help="measured time per backend and batch size")
    parser.add_argument("--gpu-id", type=int, help="measure on cuda:<id> (the CPU when CUDA is not usable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    spec = registry.get(args.model)
    result = measure(spec, ROOT / "checkpoints" / spec.name, ROOT / "artifacts" / spec.name, threads=args.threads,
                     batch_sizes=args.batch_sizes, seconds=args.seconds, gpu_id=args.gpu_id)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
