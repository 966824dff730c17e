"""What tracing costs: one model served twice in one run, tracing off and on (spans to a real OTLP receiver,
loadtest/otlp.py), side by side.

    python -m loadtest.bench.tracing --model digits          # `make trace-bench MODEL=digits`

Both servers serve the build tree's archive on free loopback ports (stopped by their PIDs); the traced one is told
the receiver's address the way an operator tells it a collector's (OTEL_EXPORTER_OTLP_ENDPOINT, handlers/tracing.py),
and every request to it carries a sampled `traceparent`. Latency: `--pairs` sequential pairs, the two servers
alternating. Throughput: `--users` closed-loop clients for `--seconds` on each, off then on, `--rounds` times. Prints
p50/p99, requests/s, the ratios traced/untraced and the spans the receiver got (six a request: the frontend's
and the worker's five). The receiver keeps the bodies and reads them at the end, but it shares the host's cores.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
from pathlib import Path

import requests

from loadtest.bench.cache import send, throughput
from loadtest.bench.report import quantile


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def main(argv: list[str] | None = None) -> int:
    from loadtest.otlp import Receiver
    from loadtest.payloads import payloads
    from models import paths
    from serve_config.control import Ports, start, stop

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="trace-bench-"))
    store = paths.current().model_store
    sample = payloads(args.model, 1)[0]
    seen: dict[str, list[float]] = {"off": [], "on": []}
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with Receiver(strict=False) as receiver:
        servers = {}
        try:
            servers["off"] = start(work / "off", [args.model], ports=Ports.free(), model_store=store)
            servers["on"] = start(work / "on", [args.model], ports=Ports.free(), model_store=store,
                                  extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                             "OTEL_SERVICE_NAME": "trace-bench"})
            urls = {path: f"{server.inference_url}/predictions/{args.model}" for path, server in servers.items()}
            headers = {path: {**server.headers(), "Content-Type": sample.content_type}
                       for path, server in servers.items()}
            sent_on = 0
            with requests.Session() as off, requests.Session() as on:
                sessions = {"off": off, "on": on}
                for _ in range(8):  # warm connections and workers
                    for path in seen:
                        send(sessions[path], urls[path], sample.body, {**headers[path], "traceparent": traceparent()})
                        sent_on += path == "on"
                for _ in range(args.pairs):
                    for path in seen:
                        took, _ = send(sessions[path], urls[path], sample.body,
                                       {**headers[path], "traceparent": traceparent()})
                        seen[path].append(took)
                        sent_on += path == "on"
            for _ in range(args.rounds):
                for path in seen:
                    # one traceparent per client run: the worker's cost is the same for every span it records
                    rates[path].append(throughput(urls[path], sample.body,
                                                  {**headers[path], "traceparent": traceparent()},
                                                  args.users, args.seconds))
        finally:
            for path in servers:
                stop(work / path)
        spans = len(receiver.snapshot())
    print(f"{args.model}: one {sample.content_type} request of {len(sample.body)} bytes; {args.pairs} sequential "
          f"pairs, then {args.users} clients for {args.seconds:g} s per server, {args.rounds} rounds")
    print(f"{'tracing':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>8}")
    for path in ("off", "on"):
        ms = [s * 1000 for s in seen[path]]
        print(f"{path:>8} {quantile(ms, 0.5):>8.2f} {quantile(ms, 0.99):>8.2f} {statistics.mean(ms):>8.2f} "
              f"{statistics.median(rates[path]):>8.1f}")
    p50 = quantile(seen["on"], 0.5) / quantile(seen["off"], 0.5)
    rate = statistics.median(rates["on"]) / statistics.median(rates["off"])
    print(f"traced/untraced: p50 latency {p50:.2f}x, throughput {rate:.2f}x; the receiver got {spans} spans "
          f"(the sequential requests alone make {6 * sent_on}: the frontend's and the worker's five)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
