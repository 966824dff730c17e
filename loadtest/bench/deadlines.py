"""Goodput under overload, with and without client deadlines, side by side in one run on one server.

    python -m loadtest.bench.deadlines --model minilm          # `make deadline-bench MODEL=minilm`

Goodput is the answers that arrive within the client's deadline, per second. The model's capacity is measured
first (`--clients` closed-loop clients for `--seconds`); then requests are offered open-loop at `--overload` times
that rate for `--seconds`, twice: once with no deadline (the server computes every request, however long it has
queued), once with `X-Request-Timeout-Ms: <deadline>` (a request whose deadline passed while it queued is answered
504 uncomputed: handlers.requests.expired). Each phase waits for every answer before the next begins, so the
second starts on an empty queue. The server is started here on free loopback ports and stopped by its PID.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

_local = threading.local()


def _session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session


@dataclass
class Phase:
    """What one phase's answers were: (seconds into the phase it was sent, status, seconds it took) each, and the
    rate really offered. `settle_s`: the steady state begins this long into the phase (a queue takes a while to
    fill; before that an overloaded server still answers in time)."""

    name: str
    deadline_s: float
    settle_s: float
    offered_per_s: float = 0.0
    seconds: float = 0.0
    answers: list[tuple[float, int, float]] = field(default_factory=list)

    def count(self, status: int, *, in_time: bool | None = None, steady: bool = False) -> int:
        return sum(1 for sent, s, took in self.answers if s == status
                   and (in_time is None or (took <= self.deadline_s) == in_time)
                   and (not steady or sent >= self.settle_s))

    @property
    def goodput(self) -> float:
        """200s within the deadline per second, over the whole phase."""
        return self.count(200, in_time=True) / self.seconds

    @property
    def steady_goodput(self) -> float:
        """The same, of the requests sent once the phase had settled."""
        return self.count(200, in_time=True, steady=True) / max(self.seconds - self.settle_s, 1e-9)

    def line(self) -> str:
        good = [took * 1000 for _, s, took in self.answers if s == 200 and took <= self.deadline_s]
        p50 = f"{statistics.median(good):.0f}" if good else "-"
        other = len(self.answers) - self.count(200) - self.count(504) - self.count(503)
        return (f"{self.name:>16} {self.offered_per_s:>9.1f} {self.goodput:>9.1f} {self.steady_goodput:>10.1f} "
                f"{self.count(200, in_time=False):>8} {self.count(504):>6} {self.count(503):>6} {other:>6} {p50:>11}")

    HEADER = (f"{'phase':>16} {'offered/s':>9} {'goodput/s':>9} {'steady g/s':>10} {'200 late':>8} {'504':>6} "
              f"{'503':>6} {'other':>6} {'p50 good ms':>11}")


def call(url: str, body: bytes, headers: dict, timeout: float = 120.0) -> tuple[int, float]:
    start = time.perf_counter()
    try:
        status = _session().post(url, data=body, headers=headers, timeout=timeout).status_code
    except requests.RequestException:
        status = 0
    return status, time.perf_counter() - start


def capacity(url: str, body: bytes, headers: dict, clients: int, seconds: float) -> tuple[float, float]:
    """Answers per second and the median latency (s) of `clients` closed-loop clients."""
    stop_at = time.perf_counter() + seconds
    taken: list[float] = []

    def client(_: int) -> None:
        while time.perf_counter() < stop_at:
            status, took = call(url, body, headers)
            if status != 200:
                raise SystemExit(f"capacity: answered {status}")
            taken.append(took)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return len(taken) / (time.perf_counter() - start), statistics.median(taken)


def offer(phase: Phase, url: str, body: bytes, headers: dict, rate: float, seconds: float, *,
          concurrency: int = 512) -> Phase:
    """Send at `rate` per second for `seconds` whatever the answers (open loop), then wait for every answer."""
    lock = threading.Lock()

    def one() -> None:
        sent = time.perf_counter() - start
        answer = call(url, body, headers)
        with lock:
            phase.answers.append((sent, *answer))

    start = time.perf_counter()
    sent = 0
    with ThreadPoolExecutor(concurrency) as pool:
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate) + 1
            while sent < due:
                pool.submit(one)
                sent += 1
            time.sleep(max(0.0, (sent / rate) - (time.perf_counter() - start)))
        phase.seconds = time.perf_counter() - start
    phase.offered_per_s = sent / phase.seconds
    return phase


def compare(url: str, body: bytes, headers: dict, *, clients: int, seconds: float, overload: float,
            deadline_ms: int) -> tuple[float, float, list[Phase]]:
    """Capacity, its median latency, and the two overload phases (no deadline, then the deadline)."""
    for _ in range(10):
        call(url, body, headers)
    rate, median = capacity(url, body, headers, clients, seconds)
    deadline_s = deadline_ms / 1000
    settle_s = seconds / 4
    phases = [offer(Phase("no deadline", deadline_s, settle_s), url, body, headers, overload * rate, seconds),
              offer(Phase(f"deadline {deadline_ms} ms", deadline_s, settle_s), url, body,
                    {**headers, "X-Request-Timeout-Ms": str(deadline_ms)}, overload * rate, seconds)]
    return rate, median, phases


def main(argv: list[str] | None = None) -> int:
    from loadtest.payloads import payloads
    from models import paths
    from serve_config.control import Ports, start, stop

    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.deadlines", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop clients that measure capacity")
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase")
    parser.add_argument("--overload", type=float, default=3.0, help="offered rate over capacity")
    parser.add_argument("--deadline-ms", type=int, default=1000)
    args = parser.parse_args(argv)
    sample = payloads(args.model, 1)[0]
    run_dir = Path(tempfile.mkdtemp(prefix="deadline-bench-"))
    server = start(run_dir, [args.model], ports=Ports.free(), model_store=paths.current().model_store)
    try:
        url = f"{server.inference_url}/predictions/{args.model}"
        rate, median, phases = compare(url, sample.body, {**server.headers(), "Content-Type": sample.content_type},
                                       clients=args.clients, seconds=args.seconds, overload=args.overload,
                                       deadline_ms=args.deadline_ms)
    finally:
        stop(run_dir)
    print(f"{args.model}: capacity {rate:.1f} answers/s ({args.clients} closed-loop clients, median "
          f"{median * 1000:.0f} ms); then {args.overload:g}x that offered open-loop for {args.seconds:g} s per phase; "
          f"goodput: 200 answers within {args.deadline_ms} ms, per second (steady: of the requests sent after the "
          f"first {phases[0].settle_s:g} s)")
    print(Phase.HEADER)
    for phase in phases:
        print(phase.line())
    without, with_deadline = phases
    print(f"goodput with deadlines / without: {with_deadline.goodput / max(without.goodput, 1e-9):.2f}x over the "
          f"phase, steady {with_deadline.steady_goodput:.1f} against {without.steady_goodput:.1f} answers/s "
          f"(of capacity: {with_deadline.steady_goodput / rate:.2f} against {without.steady_goodput / rate:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
