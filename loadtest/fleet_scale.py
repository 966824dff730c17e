"""Aggregate throughput of a fleet with 1, 2, ... replicas behind HAProxy, with the CPU each part uses
(`make fleet-scale`).

For each fleet size: start the fleet (serve_config.fleet), drive it through the balancer with distributed Locust
(one master, `--workers` worker processes) at the same users for the same time, and read the CPU seconds of
every replica's process tree (frontend and workers), of HAProxy and of Locust over the run. Prints a table and
writes it as JSON and Markdown under --out. On a 2-core machine more replicas cannot add throughput: they share
the same two cores (docs/fleet.md says what the table shows and how it maps to Kubernetes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

from loadtest.procs import tree_cpu_seconds
from loadtest.run import Run
from models.paths import FULL, ROOT
from serve_config import fleet as fleets
from serve_config.control import owned_pid


def measure(model: str, replicas: int, *, model_store: Path, users: int, seconds: int, workers: int,
            out: Path) -> dict:
    """One fleet size: req/s, latency and CPU cores used by each part while Locust drives the balancer."""
    with tempfile.TemporaryDirectory(prefix=f"fleet{replicas}-") as tmp:
        fleet = fleets.launch(Path(tmp), replicas, [model], model_store=model_store)
        try:
            pids = {r.name: r.server.pid() for r in fleet.replicas}
            balancer = owned_pid(Path(fleet.root) / fleets.BALANCER_PID)
            # A short warm-up run first, so that the measured one starts on warm workers and connections.
            Run(model, fleet.url, fleet.token(), users=users, duration="3s", out=out / "warmup",
                workers=workers).finish(timeout=120)
            before = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
            haproxy0, t0 = tree_cpu_seconds(balancer), time.perf_counter()
            locust = Run(model, fleet.url, fleet.token(), users=users, duration=f"{seconds}s", out=out, workers=workers)
            locust_cpu = 0.0
            while locust.process.poll() is None:
                locust_cpu = max(locust_cpu, tree_cpu_seconds(locust.process.pid))
                time.sleep(0.5)
            summary = locust.finish()
            wall = time.perf_counter() - t0
            served = {name: int(row["stot"]) for name, row in fleets.stats(fleet).items()}
            cores = {name: (tree_cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}
            return {"replicas": replicas, "users": users, "seconds": seconds, "locust_workers": workers,
                    "rps": summary.rps, "requests": summary.requests, "failures": summary.failures,
                    "p50_ms": summary.p50_ms, "p99_ms": summary.p99_ms,
                    "replica_cores": {k: round(v, 2) for k, v in cores.items()},
                    "replica_share": {k: round(v / max(1, sum(served.values())), 3) for k, v in served.items()},
                    "haproxy_cores": round((tree_cpu_seconds(balancer) - haproxy0) / wall, 2),
                    "locust_cores": round(locust_cpu / wall, 2)}
        finally:
            fleets.shutdown(Path(tmp))


def table(rows: list[dict]) -> list[str]:
    base = rows[0]["rps"] or float("nan")
    lines = ["| replicas | req/s | over 1 replica | p50 ms | p99 ms | failures | CPU cores per replica | HAProxy | Locust |",
             "|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        per = ", ".join(f"{c:.2f}" for c in r["replica_cores"].values())
        lines.append(f"| {r['replicas']} | {r['rps']:.0f} | {r['rps'] / base:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['failures']} | {per} | {r['haproxy_cores']:.2f} | {r['locust_cores']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--model-store", type=Path, default=FULL.model_store)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="Locust worker processes (distributed mode)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "fleet-scale")
    args = parser.parse_args(argv)
    out = args.out / f"{args.model}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.replicas:
        row = measure(args.model, n, model_store=args.model_store, users=args.users, seconds=args.seconds,
                      workers=args.workers, out=out / f"replicas-{n}")
        print(f"  {n} replica(s): {row['rps']:.0f} req/s, p99 {row['p99_ms']:.0f} ms, failures {row['failures']}, "
              f"replica cores {row['replica_cores']}, haproxy {row['haproxy_cores']}, locust {row['locust_cores']}",
              flush=True)
        rows.append(row)
    lines = [f"{args.model} through HAProxy on {os.cpu_count()} cores, {args.users} users, {args.seconds} s each, "
             f"Locust with {args.workers} workers:", "", *table(rows)]
    (out / "fleet_scale.json").write_text(json.dumps(rows, indent=2))
    (out / "fleet_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {out}/fleet_scale.md")
    return 0 if all(r["failures"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
