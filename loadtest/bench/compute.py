"""The compute limit: in-process throughput of a model per backend and batch size, no server involved.

    python -m loadtest.bench.compute --model digits --threads 1 --out compute.json [--seconds 1.0]

Runs in its own process with the thread budget a TorchServe worker of this model gets (set the way the
handler sets it, through models.runtime.ThreadBudget), on the worker's device policy, after warm-up.
Backends: the eager model from the checkpoint and every exported artifact, each through the same runner
class the handler uses. What goes in is the model's workload (the registry's `bench_workload`):
- ImageWorkload: random tensors of the registry's input spec (an image model's cost does not depend on the
  pixels); preprocessing measured on the real payloads;
- TextWorkload: the bench's own payload texts (their lengths decide the cost), taken `batch` at a time in
  arrival order and length-grouped and padded as the handler does;
- TensorWorkload: random tensors of the input spec; preprocessing is parsing and checking the real payloads'
  infer requests.
Each kind names its workload (handlers.kinds).
The checkpoint and artifacts come from the build tree in $BUILD_TREE (the full one by default).
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
from models import checkpoint, paths, registry
from models.runtime import ModuleRunner, ThreadBudget, load_runner, select_device

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
Run = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def eager_runner(checkpoint_dir: Path, device) -> ModuleRunner:
    model, _ = checkpoint.load(checkpoint_dir)
    return ModuleRunner(model, device)


def items_per_second(run: Run, passes: list[list[torch.Tensor]], items: int, *, seconds: float) -> float:
    """Warm up (every forward pass of `passes` once, and at least three calls), then run them all, round after
    round, until `seconds` have passed and at least three calls were made; return items/s, where one round
    carries `items` items. Runners return CPU tensors, so each call includes its device synchronisation."""
    calls = 0
    while calls < 3:
        for inputs in passes:
            run(inputs)
            calls += 1
    rounds, calls, start = 0, 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        for inputs in passes:
            run(inputs)
            calls += 1
        rounds += 1
    return rounds * items / (time.perf_counter() - start)


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
    summary = (f"decode, convert, resize, normalise: {with_draft:.2f} ms per image "
               f"({without:.2f} ms without reduced-size JPEG decoding)")
    print(f"  preprocess: {summary}", flush=True)
    return {"ms_per_item": with_draft, "unit": "image", "ms_per_image_full_decode": without, "payloads": len(bodies),
            "summary": summary}


def bench_texts(spec: registry.ModelSpec, count: int = 256) -> list[str]:
    """The texts of the bench's payloads (what Locust sends), in their order."""
    import json

    from loadtest.payloads import payloads

    texts = []
    for p in payloads(spec.name, count):
        texts.append(json.loads(p.body)["text"] if p.content_type == "application/json" else p.body.decode("utf-8"))
    return texts


def text_batches(preset, texts: list[str], batch: int, *, max_tokens: int, max_texts: int) -> list[list[torch.Tensor]]:
    """The payload texts `batch` at a time, each batch cut into length groups and padded as the handler does:
    the forward passes a served batch of that size makes."""
    from models.text import length_groups

    encoded = preset.encode(texts)
    passes = []
    for start in range(0, len(encoded) - batch + 1, batch):
        chunk = encoded[start : start + batch]
        for group in length_groups([e.tokens for e in chunk], max_tokens=max_tokens, max_texts=max_texts):
            passes.append(list(preset.collate([chunk[i] for i in group])))
    return passes


def text_preprocess_cost(preset, texts: list[str], handler_config: dict, *, rounds: int = 3) -> dict:
    """Tokenizing cost per text (one call per 16 texts, as a batch arrives), and how much of the computed
    token positions are padding with and without length grouping, over the payload mix."""
    from models.text import length_groups, padding_fraction

    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(texts), 16):
            preset.encode(texts[i : i + 16])
    ms = (time.perf_counter() - start) * 1000 / (rounds * len(texts))
    lengths = [e.tokens for e in preset.encode(texts)]
    chunks = [list(range(i, min(i + 16, len(lengths)))) for i in range(0, len(lengths), 16)]
    grouped = [[c[j] for j in g] for c in chunks
               for g in length_groups([lengths[i] for i in c], max_tokens=handler_config.get("max_batch_tokens", 8192),
                                      max_texts=handler_config.get("max_group_texts", 64))]
    summary = (f"tokenize: {ms:.3f} ms per text; {sum(lengths) / len(lengths):.0f} tokens per text on average; "
               f"padding {padding_fraction(lengths, grouped):.0%} of positions with length grouping, "
               f"{padding_fraction(lengths, chunks):.0%} padded to each batch's longest, "
               f"{1 - sum(lengths) / (len(lengths) * preset.max_length):.0%} padded to {preset.max_length}")
    print(f"  preprocess: {summary}", flush=True)
    return {"ms_per_item": ms, "unit": "text", "payloads": len(texts), "mean_tokens": sum(lengths) / len(lengths),
            "padding_grouped": padding_fraction(lengths, grouped), "padding_batch": padding_fraction(lengths, chunks),
            "summary": summary}


class ImageWorkload:
    """An image model: random tensors of the input spec, and the real payloads' decode cost."""

    unit = "image"
    forms = ("oip-bytes", "oip-pixels")  # the bench's request forms beside the native one (loadtest.payloads)

    def __init__(self, spec: registry.ModelSpec, artifacts: Path, handler_config: dict) -> None:
        self.spec = spec

    def passes(self, batch: int) -> tuple[list[list[torch.Tensor]], int]:
        """The forward passes a served batch of `batch` requests makes, and how many items they carry."""
        return [reference_inputs(self.spec, batch, "random", None)], batch

    def preprocess(self) -> dict:
        return preprocess_cost(self.spec)


class TextWorkload:
    """A text model: the payload texts, length-grouped per batch as the handler groups them, and tokenizing cost."""

    unit = "text"
    forms = ("oip-bytes",)

    def __init__(self, spec: registry.ModelSpec, artifacts: Path, handler_config: dict) -> None:
        from models.text import TextPreset

        self.spec, self.handler_config = spec, handler_config
        self.preset = TextPreset.from_description(mf.read(artifacts)["preset"], artifacts)
        self.texts = bench_texts(spec, 64)
        self.grouping = {"max_tokens": handler_config.get("max_batch_tokens", 8192),
                         "max_texts": handler_config.get("max_group_texts", 64)}

    def passes(self, batch: int) -> tuple[list[list[torch.Tensor]], int]:
        return text_batches(self.preset, self.texts, batch, **self.grouping), len(self.texts) // batch * batch

    def preprocess(self) -> dict:
        return text_preprocess_cost(self.preset, bench_texts(self.spec), self.handler_config)


class TensorWorkload:
    """A tensor-kind model: random rows of the input spec, and the cost of parsing and checking real infer requests."""

    unit = "row"
    forms = ("oip-json",)

    def __init__(self, spec: registry.ModelSpec, artifacts: Path, handler_config: dict) -> None:
        self.spec, self.artifacts, self.handler_config = spec, artifacts, handler_config

    def passes(self, batch: int) -> tuple[list[list[torch.Tensor]], int]:
        return [reference_inputs(self.spec, batch, "random", None)], batch

    def preprocess(self, *, count: int = 64, rounds: int = 3) -> dict:
        """Milliseconds per row to parse and check the payloads' infer requests, as the handler's preprocess does."""
        from handlers.kinds import tensor
        from loadtest.payloads import payloads

        manifest = mf.read(self.artifacts)
        pipeline = tensor.build(self.artifacts, manifest, None, tensor.Settings.from_mapping(self.handler_config),
                                served_as=(self.spec.name, "1"), max_batch=1)
        requests = [{"body": p.body} for p in payloads(self.spec.name, count)]
        types = ["application/json"] * len(requests)
        pipeline.preprocess(requests, types)
        start = time.perf_counter()
        for _ in range(rounds):
            batch = pipeline.preprocess(requests, types)
        rows = sum(p.rows for p in batch.parsed.values())
        ms = (time.perf_counter() - start) * 1000 / (rounds * rows)
        summary = f"parse and check the infer request: {ms:.3f} ms per row ({rows} rows in {len(requests)} requests)"
        print(f"  preprocess: {summary}", flush=True)
        return {"ms_per_item": ms, "unit": "row", "payloads": len(requests), "summary": summary}


def measure(spec: registry.ModelSpec, checkpoint_dir: Path, artifacts: Path, *, threads: int,
            batch_sizes: Sequence[int], seconds: float, gpu_id: int | None = None,
            handler_config: dict | None = None) -> dict:
    budget = ThreadBudget(intra_op=threads)
    budget.apply_to_torch()
    device = select_device(gpu_id)
    manifest = mf.read(artifacts)
    runners = {"eager": eager_runner(checkpoint_dir, device)}
    for fmt in spec.formats:
        runners[fmt] = load_runner(artifacts / manifest["artifacts"][fmt]["file"], device, budget)
    workload = registry.resolve(spec.bench_workload)(spec, artifacts, handler_config or {})
    table: dict[str, dict[int, float]] = {}
    for backend, run in runners.items():
        table[backend] = {}
        for batch in batch_sizes:
            passes, items = workload.passes(batch)
            table[backend][batch] = items_per_second(run, passes, items, seconds=seconds)
            print(f"  {backend:<9} batch {batch:>3}: {table[backend][batch]:10.1f} {workload.unit}s/s", flush=True)
    preprocess = workload.preprocess()

    def fastest(backends: list[str]) -> dict:
        backend, batch = max(((b, n) for b in backends for n in table[b]), key=lambda bn: table[bn[0]][bn[1]])
        return {"backend": backend, "batch": batch, "samples_per_s": table[backend][batch]}

    # The limit served throughput is held to: the fastest backend that meets the model's parity tolerance, or
    # the one it serves. A variant verified to a looser one (INT8) and not served is reported as the fastest of all.
    parity = [b for b in table if b not in spec.format_tolerance or b == spec.serve_artifact]
    return {"threads": threads, "device": str(device), "seconds_per_point": seconds, "preprocess": preprocess,
            "samples_per_s": {b: {str(n): v for n, v in row.items()} for b, row in table.items()},
            "best": fastest(parity), "fastest": fastest(list(table))}


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
    handler_config = paths.model_config_values(spec.name).get("handler")
    tree = paths.current()
    result = measure(spec, tree.checkpoint(spec.name), tree.artifacts(spec.name), threads=args.threads,
                     batch_sizes=args.batch_sizes, seconds=args.seconds, gpu_id=args.gpu_id,
                     handler_config=handler_config)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
