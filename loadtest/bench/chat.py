"""Streams against a served generator: time to first token and output tokens/s at several numbers of concurrent
streams, measured side by side in one run, and each level's throughput over one stream's.

    python -m loadtest.bench.chat --model chat --streams 1 4 8 16      # `make chat-bench`

Each stream asks the native route for `--answer` tokens (ignore_eos, greedy) after a prompt of `--prompt` tokens of
real text; every level sends `rounds` waves of `streams` requests released together. The server is started here on
free loopback ports from the build tree's model store and stopped by its PID. Peers (`transformers serve`, LitServe)
are not driven yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass(frozen=True)
class Stream:
    first_token_s: float
    seconds: float
    tokens: int


@dataclass(frozen=True)
class Level:
    streams: int
    results: tuple[Stream, ...]
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.results) / self.wall_s

    def first_token_ms(self, q: float) -> float:
        values = sorted(r.first_token_s * 1000 for r in self.results)
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class ChatWorkload:
    """What one stream asks: a prompt of about `prompt_tokens` tokens of prose, `answer_tokens` tokens back."""

    PROSE = ("The river ran past the old mill, where the miller's daughter kept the accounts and watched the "
             "barges go by with grain for the city. ")

    def __init__(self, prompt_tokens: int = 128, answer_tokens: int = 64) -> None:
        words = (self.PROSE * (prompt_tokens // 20 + 1)).split()
        self.prompt = " ".join(words[:int(prompt_tokens * 0.75)])
        self.answer_tokens = answer_tokens

    def body(self) -> dict:
        return {"prompt": self.prompt, "max_tokens": self.answer_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}


def stream_once(url: str, headers: dict, body: dict) -> Stream:
    start = time.perf_counter()
    first = None
    last_line = {}
    with requests.post(url, json=body, headers=headers, stream=True, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line:
                continue
            last_line = json.loads(line)
            if first is None and last_line.get("text"):
                first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    return Stream(first if first is not None else elapsed, elapsed, last_line["usage"]["completion_tokens"])


def drive(url: str, headers: dict, workload: ChatWorkload, streams: int, rounds: int) -> Level:
    results: list[Stream] = []
    start = time.perf_counter()
    for _ in range(rounds):
        barrier = threading.Barrier(streams)

        def one(_i: int) -> Stream:
            barrier.wait(timeout=60)
            return stream_once(url, headers, workload.body())

        with ThreadPoolExecutor(streams) as pool:
            results += list(pool.map(one, range(streams)))
    return Level(streams, tuple(results), time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from models import paths
    from serve_config.control import Ports, start, stop

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chat")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--answer", type=int, default=64)
    args = parser.parse_args(argv)
    workload = ChatWorkload(args.prompt, args.answer)
    run_dir = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    server = start(run_dir, [args.model], ports=Ports.free(), model_store=paths.current().model_store)
    try:
        url = f"{server.inference_url}/predictions/{args.model}"
        stream_once(url, server.headers(), workload.body())  # warm
        levels = [drive(url, server.headers(), workload, n, args.rounds) for n in args.streams]
    finally:
        stop(run_dir)
    base = levels[0].tokens_per_s
    print(f"{args.model}: {args.prompt}-token prompts, {args.answer}-token answers, {args.rounds} waves per level")
    print(f"{'streams':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'tokens/s':>9} {'x one stream':>13}")
    for level in levels:
        print(f"{level.streams:>8} {level.first_token_ms(0.5):>12.0f} {level.first_token_ms(0.99):>12.0f} "
              f"{level.tokens_per_s:>9.1f} {level.tokens_per_s / base:>13.2f}")
    print(f"mean stream time at {levels[-1].streams}: {statistics.mean(r.seconds for r in levels[-1].results):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
