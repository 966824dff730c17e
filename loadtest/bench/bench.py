"""`make bench MODEL=<name> [QUICK=1]`: served throughput against its own limits and the stock peer, in one run.

On one machine, one after the other, in the same conditions:
1. compute limit: in-process samples/s per backend and batch size, with a worker's thread budget
   (loadtest/compute.py, its own process, run before the server starts);
2. one TorchServe (free loopback ports, the checked-in config.properties) serving three models:
   - served:  our archive, model_store/<model>.mar, as `make serve` serves it;
   - ceiling: the same model config with an empty handler (loadtest/bench/empty_handler.py);
   - peer:    TorchServe's stock image classifier on the same weights (registry `peer_handler`),
              with TorchServe's default batching and threads, once with one worker and once with as many
              as ours (stock threads oversubscribe a small host, so more workers can be slower); the
              peer's figure is the better of the two;
3. Locust (loadtest/bench/drive.py) drives each at rising concurrency, recording requests/s, latency
   percentiles, failures, the handler's per-batch metrics, and the CPU of load generator and server; then the
   served model on each other backend the registry's `bench_backends` names (its own archive, same config and
   handler), and in the other request forms (Open Inference Protocol BYTES, and pixel tensors for an image
   model), at the same concurrency levels, to compare with the served default in its native form.
The report (JSON, Markdown, PNG) goes to results/bench/<model>-<timestamp>/; the ratios print last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


from export import archive
from loadtest.bench import records, report
from loadtest.bench.records import Plan, Step, StepResult, Target
from models import registry
from models import paths
from models.paths import FULL as FULL_TREE, Layout, ROOT, TREE_VARIABLE, model_config, model_config_values
from serve_config import control as ts

WARMUP = "server-warmup"


@dataclass(frozen=True)
class Mode:
    """How long and how widely to measure. QUICK=1 keeps the whole run under a minute."""

    levels: tuple[int, ...]
    warmup_s: float
    seconds: float
    server_warmup_s: float  # once, before any measured step: the JVM compiles its hot paths under load
    compute_batches: tuple[int, ...]
    compute_seconds: float


FULL = Mode(levels=(1, 4, 16, 64), warmup_s=2.0, seconds=8.0, server_warmup_s=10.0,
            compute_batches=(1, 2, 4, 8, 16, 32, 64), compute_seconds=0.5)
QUICK = Mode(levels=(4, 32), warmup_s=0.5, seconds=2.0, server_warmup_s=2.0, compute_batches=(1, 8),
             compute_seconds=0.1)


def serve_settings(spec: registry.ModelSpec) -> dict:
    """The model's checked-in TorchServe model config (serve_config/<model>.yaml)."""
    return model_config_values(spec.name)


def build_store(spec: registry.ModelSpec, work: Path, tree: Layout = FULL_TREE) -> tuple[Path, list[Target]]:
    """A model store holding the targets; returns it and the targets to drive."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    mar = tree.archive(spec.name)
    if not mar.exists():
        raise SystemExit(f"{mar} is missing: run `make archive MODEL={spec.name}`")
    for path in (mar, mar.with_name(mar.name + ".sha256")):  # the server checks each archive against its sha256
        shutil.copy2(path, store / path.name)
    artifacts, config = tree.artifacts(spec.name), model_config(spec.name)
    workers = serve_settings(spec).get("minWorkers", 1)
    endpoints = [Target("served", spec.name, workers), Target("ceiling", f"{spec.name}-ceiling", workers)]
    for backend in spec.bench.backends:  # the same config and handler on another verified artifact
        endpoints.append(Target(f"backend {backend}", f"{spec.name}-{backend}", workers, backend=backend))
        archive.archive(spec, artifacts, store, config=config, name=endpoints[-1].endpoint,
                        artifact=registry.BACKEND_ARTIFACT[backend], staging=work / f"extra-{backend}")
    archive.archive(spec, artifacts, store, config=config, name=endpoints[1].endpoint,
                    handler="loadtest/bench/empty_handler.py", staging=work / "extra-ceiling")
    source = {}
    if spec.bench.peer_artifact == "pretrained":  # the eager library model, from the checked pretrained files
        folder = registry.resolve(spec.pretrained_files)()
        source = {"serialized": folder / "model.safetensors",
                  "extra": tuple(p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".json", ".txt"))}
    for count in sorted({1, workers}):
        peer_config = work / f"peer-w{count}.yaml"  # as a TorchServe user writes it: workers only, default batching
        peer_config.write_text(f"minWorkers: {count}\nmaxWorkers: {count}\n")
        endpoints.append(Target("peer", f"{spec.name}-peer-w{count}", count))
        archive.archive(spec, artifacts, store, config=peer_config, name=endpoints[-1].endpoint,
                        artifact=spec.bench.peer_artifact, handler=spec.bench.peer_handler, staging=work / "extra-peer",
                        **source)
    return store, endpoints


def run_compute(spec: registry.ModelSpec, threads: int, mode: Mode, out: Path, tree: Layout = FULL_TREE) -> dict:
    print(f"[1/3] compute limit: in-process, {threads} intra-op thread(s) per worker", flush=True)
    subprocess.run([sys.executable, "-m", "loadtest.bench.compute", "--model", spec.name, "--threads", str(threads),
                    "--seconds", str(mode.compute_seconds), "--out", str(out),
                    "--batch-sizes", *map(str, mode.compute_batches)], cwd=ROOT, check=True,
                   env={**os.environ, TREE_VARIABLE: str(tree.root)})
    return json.loads(out.read_text())


def serve_and_drive(payload_model: str, store: Path, endpoints: list[str], steps: list[Step], work: Path, *,
                    timeout: float = 180.0, server_warmup_s: float = 10.0) -> list[StepResult]:
    """Start one TorchServe serving `endpoints` from `store` on free loopback ports, let Locust
    (loadtest/bench/drive.py) run through `steps` with `payload_model`'s payloads, stop the server by its PID;
    return the step results.

    A fresh JVM runs its first seconds of load interpreted, so `server_warmup_s` of load on the first step's
    endpoint at the highest concurrency goes first, unmeasured; otherwise the first step would pay for it."""
    warm = [dataclasses.replace(steps[0], target=dataclasses.replace(steps[0].target, target=WARMUP),
                                users=max(s.users for s in steps), warmup=0.0, seconds=server_warmup_s)
            ] if server_warmup_s > 0 else []
    run_dir = work / "run"
    ts.stop(run_dir)  # one an interrupted bench left running, before its PID file goes
    shutil.rmtree(run_dir, ignore_errors=True)
    try:  # start() raises ModelLoadError with the server still up (it serves the models that loaded): stop it too
        server = ts.start(run_dir, endpoints, ports=ts.Ports.free(), model_store=store, timeout=timeout)
        plan = Plan.for_server(server, payload_model).with_steps([*warm, *steps])
        return [r for r in records.run(plan, work) if r.target.target != WARMUP]
    finally:
        ts.stop(run_dir)


def run_load(spec: registry.ModelSpec, store: Path, endpoints: list[Target], mode: Mode, work: Path) -> list[StepResult]:
    """Every endpoint at every level; then the served model again in each other request form its workload
    names (Open Inference Protocol BYTES rows, pixel tensors), at the same levels."""
    served = next(e for e in endpoints if e.target == "served")
    forms = [dataclasses.replace(served, target=form, form=form) for form in registry.resolve(spec.bench_workload).forms]
    backends = [e for e in endpoints if e.backend is not None]
    # A step lasts at least three p99 budgets, so that even the slowest target (a stock peer of a heavy model)
    # completes requests in it; QUICK's 2 s would not for a model whose requests take a second.
    seconds = max(mode.seconds, 3 * spec.bench.p99_ms / 1000)
    # The other backends and forms run right after served and before the peers: a stock peer leaves a queue of
    # requests its workers finish after its step ends, and the next steps would share the CPU with them.
    order = [endpoints[0], *backends, *forms, *(e for e in endpoints[1:] if e.backend is None)]
    steps = [Step(e, users, mode.warmup_s, seconds) for e in order for users in mode.levels]
    print(f"[2/3] starting TorchServe with {', '.join(e.endpoint for e in endpoints)}; then [3/3] Locust: "
          f"{mode.server_warmup_s:g}s server warm-up, {len(steps)} steps of {seconds:g}s (+{mode.warmup_s:g}s "
          "warm-up)", flush=True)
    return serve_and_drive(spec.name, store, [e.endpoint for e in endpoints], steps, work,
                           server_warmup_s=mode.server_warmup_s)


def bench(model: str, *, quick: bool, out_root: Path, tree: Layout = FULL_TREE) -> Path:
    spec = registry.get(model)
    mode = QUICK if quick else FULL
    settings = serve_settings(spec)
    threads = int((settings.get("handler") or {}).get("intra_op_threads", 1))
    report_dir = out_root / f"{spec.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    report_dir.mkdir(parents=True)
    work = ROOT / "build" / "bench" / spec.name
    work.mkdir(parents=True, exist_ok=True)
    compute = run_compute(spec, threads, mode, work / "compute.json", tree)
    store, endpoints = build_store(spec, work, tree)
    steps = run_load(spec, store, endpoints, mode, work)
    data = report.assemble(spec, settings, compute, steps, quick=quick)
    report.write(data, report_dir)
    print(f"report: {report_dir}/report.md (JSON: bench.json, plots: *.png)")
    print(report.ratios_text(data))
    return report_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--quick", action="store_true", help="a run of under a minute: fewer levels, shorter steps")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    bench(args.model, quick=args.quick, out_root=args.out, tree=paths.current())
    return 0


if __name__ == "__main__":
    sys.exit(main())
