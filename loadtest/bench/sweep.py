"""`make sweep MODEL=<name>`: measure serving settings to choose the defaults in serve_config/<name>.yaml.

One factor at a time around the checked-in config: backend, batchSize, maxBatchDelay, and workers x
intra-op threads. Every variant is packed as its own archive (<name>-<variant>.mar, the model config
rewritten) and all are served by one TorchServe, so one start-up serves the whole sweep; idle
workers cost no CPU. Locust (loadtest/bench/drive.py) then drives each variant at the same concurrency levels.
The result (JSON and a Markdown table, best first) goes to results/sweep/<name>-<timestamp>/; the best
variant is the most requests/s with no failure and p99 within the registry's bench.p99_ms.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from export import archive
from loadtest.bench.bench import serve_and_drive, serve_settings
from loadtest.bench.records import Step, Target
from models import registry
from models import paths
from models.paths import ROOT
from models.registry import BACKEND_ARTIFACT
LEVELS = (8, 32, 64)


@dataclass(frozen=True)
class Variant:
    backend: str
    batch_size: int
    delay_ms: int
    workers: int
    threads: int
    decode_threads: int = 1

    @property
    def name(self) -> str:
        return f"{self.backend}-b{self.batch_size}-d{self.delay_ms}-w{self.workers}x{self.threads}-p{self.decode_threads}"

    def config(self, base: dict) -> dict:
        config = copy.deepcopy(base)
        config.update(batchSize=self.batch_size, maxBatchDelay=self.delay_ms, minWorkers=self.workers,
                      maxWorkers=self.workers)
        config.setdefault("handler", {})["intra_op_threads"] = self.threads
        config["handler"]["preprocess_threads"] = self.decode_threads
        return config


def variants(spec: registry.ModelSpec, base: dict, grid: tuple[list[int], list[int]] | None = None) -> list[Variant]:
    """The checked-in config, then one factor changed at a time; with `grid` (batch sizes, delays),
    the checked-in config and every batch size x delay pair instead."""
    handler = base.get("handler") or {}
    start = Variant(spec.serve_backend, base.get("batchSize", 1), base.get("maxBatchDelay", 100),
                    base.get("minWorkers", 1), handler.get("intra_op_threads", 1), handler.get("preprocess_threads", 1))
    out = [start]
    if grid:
        out += [Variant(start.backend, n, d, start.workers, start.threads, start.decode_threads)
                for n in grid[0] for d in grid[1]]
        return list(dict.fromkeys(out))
    same = {"batch_size": start.batch_size, "delay_ms": start.delay_ms, "workers": start.workers,
            "threads": start.threads, "decode_threads": start.decode_threads}
    out += [Variant(b, **same) for b in BACKEND_ARTIFACT if BACKEND_ARTIFACT[b] in spec.formats]
    out += [Variant(start.backend, **{**same, "batch_size": n}) for n in (1, 4, 8, 16, 32)
            if n <= max(spec.verify_batch_sizes)]
    out += [Variant(start.backend, **{**same, "delay_ms": d}) for d in (1, 2, 5, 10, 20)]
    out += [Variant(start.backend, **{**same, "workers": w, "threads": t, "decode_threads": p})
            for w, t, p in ((1, 1, 1), (1, 2, 1), (1, 2, 2), (2, 1, 1))]
    return list(dict.fromkeys(out))


def sweep(model: str, out_root: Path, *, seconds: float, warmup: float,
          grid: tuple[list[int], list[int]] | None = None) -> Path:
    spec = registry.get(model)
    base = serve_settings(spec)
    work = ROOT / "build" / "sweep" / spec.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    store = work / "store"
    points = variants(spec, base, grid)
    names = {}
    for v in points:
        config = work / f"{v.name}.yaml"
        config.write_text(yaml.safe_dump(v.config(base), sort_keys=False))
        names[v] = f"{spec.name}-{v.name}"
        archive.archive(spec, paths.current().artifacts(spec.name), store, config=config, name=names[v],
                        artifact=BACKEND_ARTIFACT[v.backend], staging=work / "extra")
    steps = [Step(Target(v.name, names[v]), u, warmup, seconds) for v in points for u in LEVELS]
    print(f"starting TorchServe with {len(points)} variants of {spec.name}", flush=True)
    results = serve_and_drive(spec.name, store, list(names.values()), steps, work, timeout=600)
    rows = []
    for v in points:
        mine = [r for r in results if r.target.target == v.name]
        ok = [r for r in mine if r.failures == 0 and r.p99_ms <= spec.bench.p99_ms]
        best = max(ok or mine, key=lambda r: r.rps)
        rows.append({**v.__dict__, "variant": v.name, "rps": best.rps, "users": best.users, "p50_ms": best.p50_ms,
                     "p99_ms": best.p99_ms, "within_budget": bool(ok), "levels": {r.users: r.rps for r in mine}})
    rows.sort(key=lambda r: (r["within_budget"], r["rps"]), reverse=True)
    out = out_root / f"{spec.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"model": spec.name, "base": base, "levels": LEVELS,
                                                "seconds": seconds, "rows": rows}, indent=1))
    table = ["| backend | batchSize | maxBatchDelay ms | workers x threads | decode threads | best req/s | at users "
             "| p50 ms | p99 ms |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        flag = "" if r["within_budget"] else f" (p99 over {spec.bench.p99_ms:g} ms)"
        table.append(f"| {r['backend']} | {r['batch_size']} | {r['delay_ms']} | {r['workers']} x {r['threads']} | {r['decode_threads']} | "
                     f"{r['rps']:.0f}{flag} | {r['users']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    (out / "sweep.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    best = rows[0]
    print(f"\nbest: {best['variant']}: {best['rps']:.0f} req/s at {best['users']} users, p99 {best['p99_ms']:.0f} ms")
    print(f"report: {out}/sweep.md")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="with --delays: sweep this grid instead")
    parser.add_argument("--delays", type=int, nargs="+", help="maxBatchDelay values (ms) for the grid")
    args = parser.parse_args(argv)
    if bool(args.batch_sizes) != bool(args.delays):
        parser.error("--batch-sizes and --delays go together")
    grid = (args.batch_sizes, args.delays) if args.batch_sizes else None
    sweep(args.model, args.out, seconds=args.seconds, warmup=args.warmup, grid=grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
