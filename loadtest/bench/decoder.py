"""Which decoder serves a generating model: the eager one, its torch.export program or its AOTInductor package,
side by side in one process on one host (`make decoder-bench`, MODEL=chat by default).

    python -m loadtest.bench.decoder --model chat

For 1, 4 and 16 sequences: one prefill of that many `--prompt`-token prompts, then `--answer` decode steps of all
of them together (what the worker's scheduler runs at that many concurrent streams), in rounds that take the
backends in turn so a busy host slows each alike. Printed: each backend's median prefill time and decode tokens/s,
its ratio to eager, and whether export/decoder.py verified it greedy-token-identical; last, the fastest backend that
kept parity and the one serve_config/chat.yaml serves. The decoders run on the CPU with the worker's thread count
(the YAML's handler.intra_op_threads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from export.verify import STAMP
from handlers.kinds import generate
from loadtest.bench.report import quantile
from models import chat, paths
from models.llama import KVCache, step_inputs


def measure(decoder, config, streams: int, prompt: int, answer: int) -> tuple[float, float]:
    """(prefill ms, decode tokens/s at the median step) of `streams` sequences."""
    cache = KVCache(config, streams, prompt + answer + 1)
    tokens = torch.randint(0, config.vocab_size, (streams, prompt), generator=torch.Generator().manual_seed(streams))
    positions, slots = torch.arange(prompt).repeat(streams, 1), torch.arange(streams)
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        logits = decoder(*step_inputs(tokens, positions, slots, cache))
        prefill_ms = (time.perf_counter() - start) * 1000.0
        for step in range(answer):
            after = torch.full((streams, 1), prompt + step)
            start = time.perf_counter()
            logits = decoder(*step_inputs(logits.argmax(-1)[:, None], after, slots, cache))
            steps.append(time.perf_counter() - start)
    return prefill_ms, streams / quantile(steps, 0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.decoder", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chat")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    tree = paths.current()
    checkpoint, artifacts = tree.checkpoint(args.model), tree.artifacts(args.model)
    config_path = paths.model_config("chat")
    settings = generate.Settings.from_mapping((yaml.safe_load(config_path.read_text()) or {}).get("handler"))
    torch.set_num_threads(settings.intra_op_threads)
    stamp = json.loads((artifacts / STAMP).read_text())
    verified = {"eager": True, **{fmt: figures["tokens_identical"] == figures["tokens"]
                                  for fmt, figures in stamp["artifacts"].items()}}
    decoders = {}
    for backend in generate.BACKENDS:
        decoder, config, _ = chat.load_decoder(checkpoint if backend == "eager" else artifacts, backend)
        measure(decoder, config, 1, 16, 4)  # one-off costs (allocations, first calls) out of the figures
        decoders[backend] = (decoder, config)
    figures: dict[str, dict[int, list[tuple[float, float]]]] = {b: {s: [] for s in args.streams} for b in decoders}
    for _ in range(args.rounds):
        for streams in args.streams:
            for backend, (decoder, config) in decoders.items():
                figures[backend][streams].append(measure(decoder, config, streams, args.prompt, args.answer))
    print(f"{args.model}: {args.prompt}-token prompts, {args.answer} decode steps, {settings.intra_op_threads} "
          f"threads, median of {args.rounds} rounds")
    speed = {b: {s: statistics.median(t for _, t in runs) for s, runs in per.items()} for b, per in figures.items()}
    for streams in args.streams:
        for backend in decoders:
            prefill = statistics.median(p for p, _ in figures[backend][streams])
            print(f"  {streams:2d} streams  {backend:8s} prefill {prefill:8.1f} ms  decode {speed[backend][streams]:7.1f} "
                  f"tok/s  x{speed[backend][streams] / speed['eager'][streams]:.2f} of eager  "
                  f"{'verified' if verified.get(backend) else 'NOT verified'}")
    score = {b: statistics.geometric_mean(speed[b].values()) for b in decoders if verified.get(b)}
    fastest = max(score, key=score.get)
    print(f"fastest decoder that kept greedy parity here: {fastest} (geometric mean of tokens/s over "
          f"{args.streams} streams: " + ", ".join(f"{b} {v:.1f}" for b, v in score.items())
          + f"); {config_path.name} serves {settings.backend}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
