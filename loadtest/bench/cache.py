"""The response cache's hit path against a computed request, side by side in one run on one server.

    python -m loadtest.bench.cache --model minilm          # `make cache-bench MODEL=minilm`

The model's archive from the build tree's store is copied with `response_cache_mb` set (serve_config.rollout's
versioned_copy: that one setting changed) and served on free loopback ports, stopped by its PID. Both paths send the
same request, so they differ only in what the worker does with it: `Cache-Control: no-store` makes the worker
compute it every time (decode, model, answer; nothing kept), no header lets the worker answer from its cache.
Latency: `--pairs` sequential pairs, the two paths alternating over one warm connection. Throughput: `--users`
concurrent clients for `--seconds` on each path, one path after the other. Prints p50/p99, requests/s and the
ratios computed/hit.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from loadtest.bench.report import quantile

COMPUTE = {"Cache-Control": "no-store"}


def send(session: requests.Session, url: str, body: bytes, headers: dict) -> tuple[float, str]:
    """One request's wall seconds and its X-Cache; anything but a 200 ends the bench."""
    start = time.perf_counter()
    answer = session.post(url, data=body, headers=headers, timeout=60)
    took = time.perf_counter() - start
    if answer.status_code != 200:
        raise SystemExit(f"expected a 200, got {answer.status_code}: {answer.text[:200]}")
    return took, answer.headers.get("X-Cache", "")


def latencies(url: str, body: bytes, headers: dict, pairs: int) -> dict[str, list[float]]:
    """Each path's latencies; a hit-path request that a worker had still to compute (a MISS) is left out."""
    seen: dict[str, list[float]] = {"HIT": [], "BYPASS": [], "MISS": []}
    with requests.Session() as session:
        for _ in range(8):  # the connection is warm and the workers have kept the answer
            send(session, url, body, headers)
        for _ in range(pairs):
            for extra in ({}, COMPUTE):
                took, status = send(session, url, body, {**headers, **extra})
                seen[status].append(took)
    if len(seen["HIT"]) < pairs // 2 or len(seen["BYPASS"]) != pairs:
        raise SystemExit(f"the paths were not the ones asked for: {({k: len(v) for k, v in seen.items()})}")
    return {"hit": seen["HIT"], "computed": seen["BYPASS"]}


def throughput(url: str, body: bytes, headers: dict, users: int, seconds: float) -> float:
    """Answers per second from `users` closed-loop clients for `seconds`."""
    stop_at = time.perf_counter() + seconds
    counts = [0] * users

    def client(idx: int) -> None:
        with requests.Session() as session:
            while time.perf_counter() < stop_at:
                send(session, url, body, headers)
                counts[idx] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        list(pool.map(client, range(users)))
    return sum(counts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    from loadtest.payloads import payloads
    from models import paths
    from serve_config.control import Ports, start, stop
    from serve_config.rollout import versioned_copy

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--cache-mb", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    store = work / "store"
    store.mkdir()
    versioned_copy(paths.current().archive(args.model), store / f"{args.model}.mar", "1.0",
                   handler={"response_cache_mb": args.cache_mb})
    sample = payloads(args.model, 1)[0]
    server = start(work / "run", [args.model], ports=Ports.free(), model_store=store)
    try:
        url = f"{server.inference_url}/predictions/{args.model}"
        headers = {**server.headers(), "Content-Type": sample.content_type}
        seen = latencies(url, sample.body, headers, args.pairs)
        rates = {path: throughput(url, sample.body, {**headers, **extra}, args.users, args.seconds)
                 for path, extra in (("hit", {}), ("computed", COMPUTE))}
    finally:
        stop(work / "run")
    print(f"{args.model}: one {sample.content_type} request of {len(sample.body)} bytes; {args.pairs} sequential "
          f"pairs, then {args.users} clients for {args.seconds:g} s per path")
    print(f"{'path':>9} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>8}")
    for path in ("hit", "computed"):
        ms = [s * 1000 for s in seen[path]]
        print(f"{path:>9} {quantile(ms, 0.5):>8.2f} {quantile(ms, 0.99):>8.2f} {statistics.mean(ms):>8.2f} "
              f"{rates[path]:>8.1f}")
    p50 = quantile(seen["computed"], 0.5) / quantile(seen["hit"], 0.5)
    print(f"computed/hit: p50 latency {p50:.2f}x, throughput hit/computed {rates['hit'] / rates['computed']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
