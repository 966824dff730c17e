"""`make soak MODEL=<name> [SOAK_S=600]`: steady load at about 70 % of measured capacity, memory watched.

    python -m loadtest.bench.soak --model digits --seconds 600 --out results/soak

Starts its own TorchServe (free loopback ports, the model's archive as `make serve` builds it), measures
capacity with a short closed-loop Locust step, then holds an open-paced load of `--fraction` of it for
`--seconds`, while sampling once a second the resident memory (RSS) of the frontend (Java) and of each
model worker. Writes soak.json and rss.png to results/soak/<model>-<timestamp>/ and prints the figures:
requests, failures, achieved rate, and the RSS growth of frontend and workers in % between the first
and the last fifth of the run (after a warm-up). Exits non-zero on any failed request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

from loadtest.bench import records
from loadtest.bench.records import Plan, Step, Target
from models import paths
from models.paths import FULL, ROOT
from serve_config import control as ts


class RssSampler(threading.Thread):
    """Samples RSS (MiB) of TorchServe's Java frontend and its Python workers every `interval` seconds."""

    def __init__(self, server_pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(server_pid), interval
        self.samples: list[dict] = []
        self.start_time = time.monotonic()
        self._done = threading.Event()

    def sample(self) -> dict:
        frontend = workers = 0.0
        count = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                name, rss = proc.name(), proc.memory_info().rss / 2**20
                cmdline = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if "java" in name:
                frontend += rss
            elif "model_service_worker" in cmdline:
                workers += rss
                count += 1
        return {"t": time.monotonic() - self.start_time, "frontend_mib": frontend, "workers_mib": workers,
                "workers": count}

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.sample())
            self._done.wait(self.interval)

    def stop(self) -> list[dict]:
        self._done.set()
        self.join(timeout=5)
        return self.samples


def growth(samples: list[dict], key: str) -> dict:
    """RSS change after the first 10 % (warm-up): between the first and the last fifth of the rest, and
    between its middle and last fifth. A one-off step (the JVM growing its heap once) shows in the first
    figure only; a leak shows in both."""
    usable = samples[len(samples) // 10:]
    fifth = max(1, len(usable) // 5)
    mean = lambda part: sum(s[key] for s in part) / len(part)  # noqa: E731
    first, middle, last = mean(usable[:fifth]), mean(usable[2 * fifth:3 * fifth] or usable), mean(usable[-fifth:])
    pct = lambda a, b: (b - a) / a * 100 if a else float("nan")  # noqa: E731
    return {"first_mib": first, "middle_mib": middle, "last_mib": last, "growth_pct": pct(first, last),
            "late_growth_pct": pct(middle, last), "max_mib": max(s[key] for s in usable)}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    t = [s["t"] for s in samples]
    ax.plot(t, [s["frontend_mib"] for s in samples], label="frontend (Java)")
    ax.plot(t, [s["workers_mib"] for s in samples], label="model workers (Python, summed)")
    ax.set(xlabel="seconds", ylabel="RSS (MiB)", title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def soak(model: str, *, seconds: float, fraction: float, users: int, out_root: Path,
         model_store: Path = FULL.model_store) -> dict:
    report_dir = out_root / f"{model}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    report_dir.mkdir(parents=True)
    work = ROOT / "build" / "soak" / model
    ts.stop(work / "run")  # one an interrupted soak left running, before its PID file goes
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_dir = work / "run"
    try:  # start() raises ModelLoadError with the server still up (it serves the models that loaded): stop it too
        server = ts.start(run_dir, [model], ports=ts.Ports.free(), model_store=model_store)
        plan = Plan.for_server(server, model)
        capacity_step = Step(Target("capacity", model), users, warmup=1.0, seconds=min(8.0, max(3.0, seconds / 10)))
        capacity = records.run(plan.with_steps([capacity_step]), work, "capacity")[0].rps
        rate = fraction * capacity
        print(f"soak {model}: capacity {capacity:.1f} req/s closed-loop at {users} users; holding {rate:.1f} req/s "
              f"({fraction:.0%}) for {seconds:g}s", flush=True)
        sampler = RssSampler(server.pid())
        sampler.start()
        step = Step(Target("soak", model), users, warmup=0.0, seconds=seconds, rate=rate)
        result = records.run(plan.with_steps([step]), work, "soak")[0]
        samples = sampler.stop()
    finally:
        ts.stop(run_dir)
    data = {"model": model, "seconds": seconds, "capacity_rps": capacity, "target_rps": rate, "fraction": fraction,
            "requests": result.requests, "failures": result.failures, "rejected": result.rejected,
            "rps": result.rps, "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "errors": list(result.errors),
            "rss": {"frontend": growth(samples, "frontend_mib"), "workers": growth(samples, "workers_mib")},
            "samples": samples}
    (report_dir / "soak.json").write_text(json.dumps(data, indent=1))
    plot(samples, report_dir / "rss.png", f"{model}: RSS under {rate:.0f} req/s for {seconds:g}s")
    front, workers = data["rss"]["frontend"], data["rss"]["workers"]
    print(f"soak {model}: {data['requests']} requests, {data['failures']} failures, {data['rps']:.1f} req/s "
          f"(target {rate:.1f}), p99 {data['p99_ms']:.0f} ms\n"
          f"  RSS frontend {front['first_mib']:.0f} -> {front['last_mib']:.0f} MiB ({front['growth_pct']:+.1f} %; "
          f"{front['late_growth_pct']:+.1f} % over the second half), workers {workers['first_mib']:.0f} -> "
          f"{workers['last_mib']:.0f} MiB ({workers['growth_pct']:+.1f} %; {workers['late_growth_pct']:+.1f} %)\n"
          f"  report: {report_dir}/soak.json, rss.png", flush=True)
    return {**data, "report_dir": str(report_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--fraction", type=float, default=0.7, help="share of measured capacity to hold")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "soak")
    args = parser.parse_args(argv)
    data = soak(args.model, seconds=args.seconds, fraction=args.fraction, users=args.users, out_root=args.out,
                model_store=paths.current().model_store)
    return 1 if data["failures"] or not data["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
