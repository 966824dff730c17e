"""The bench report: one JSON of every figure, a Markdown summary, PNG plots, and the ratios printed last."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from handlers.batch_metrics import BATCHES, BATCHES_BY_SIZE, REQUESTS, STAGE_MS

TARGETS = ("served", "ceiling", "peer")


def breakdown(metrics: dict[str, float]) -> dict[str, Any]:
    """Where the time went during one step, from the /metrics deltas: per batch and per request means."""
    batches, handled = metrics.get(BATCHES, 0.0), metrics.get(REQUESTS, 0.0)
    frontend_requests = metrics.get("ts_inference_requests_total", 0.0)
    out: dict[str, Any] = {"batches": batches, "mean_batch_size": handled / batches if batches else None}
    for stage, name in STAGE_MS.items():
        out[f"{stage}_ms_per_batch"] = metrics[name] / batches if batches and name in metrics else None
    for key, name in (("queue_ms_per_request", "ts_queue_latency_microseconds"),
                      ("frontend_ms_per_request", "ts_inference_latency_microseconds")):
        out[key] = metrics[name] / frontend_requests / 1000 if frontend_requests and name in metrics else None
    prefix = BATCHES_BY_SIZE + "["
    out["batches_by_size"] = {k[len(prefix):-1]: v for k, v in sorted(metrics.items(), key=lambda kv: _size(kv[0]))
                              if k.startswith(prefix) and v > 0}
    return out


def _size(key: str) -> int:
    digits = "".join(c for c in key if c.isdigit())
    return int(digits) if digits else 0


def best_step(steps: list[dict], p99_budget_ms: float) -> dict:
    """The step with the most requests/s among those without failures and within the p99 budget;
    if none meets the budget, the fastest without failures (flagged), else the fastest of all."""
    clean = [s for s in steps if s["failures"] == 0 and s["requests"] > 0]
    within = [s for s in clean if s["p99_ms"] <= p99_budget_ms]
    pool = within or clean or steps
    best = max(pool, key=lambda s: s["rps"])
    return {**best, "within_p99_budget": best in within}


def assemble(spec, settings: dict, compute: dict, steps: list[dict], *, quick: bool) -> dict[str, Any]:
    workers = int(settings.get("minWorkers", 1))
    limit = compute["best"]["samples_per_s"] * workers
    targets = {}
    for target in TARGETS:
        rows = [{**s, "breakdown": breakdown(s["server_metrics"])} for s in steps if s["target"] == target]
        targets[target] = {"steps": rows, "best": best_step(rows, spec.bench_p99_ms)}
    served, ceiling, peer = (targets[t]["best"] for t in TARGETS)

    def ratio(numerator: dict, denominator: float, against: str) -> dict[str, Any]:
        return {"value": numerator["rps"] / denominator if denominator else math.nan, "against": against,
                "served_rps": numerator["rps"], "served_users": numerator["users"], "served_p99_ms": numerator["p99_ms"]}

    return {
        "model": spec.name, "created": dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "serve_config": settings, "p99_budget_ms": spec.bench_p99_ms,
        "compute": compute,
        "compute_limit": {"samples_per_s": limit, "workers": workers, **{k: compute["best"][k] for k in ("backend", "batch")},
                          "fastest_any": {**compute.get("fastest", compute["best"]),
                                          "samples_per_s": compute.get("fastest", compute["best"])["samples_per_s"] * workers}},
        "targets": targets,
        "ratios": {
            "served_over_compute_limit": ratio(served, limit, f"compute limit {limit:.0f}/s"),
            "served_over_ceiling": {**ratio(served, ceiling["rps"], "ceiling"), "other_users": ceiling["users"],
                                    "other_p99_ms": ceiling["p99_ms"]},
            "ours_over_peer": {**ratio(served, peer["rps"], "peer"), "other_users": peer["users"],
                               "other_p99_ms": peer["p99_ms"]},
        },
    }


def write(data: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    (directory / "report.md").write_text(markdown(data))
    plot(data, directory)


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def ratios_text(data: dict[str, Any]) -> str:
    lines = [f"ratios for {data['model']} (each target at its best concurrency, p99 budget {data['p99_budget_ms']:g} ms):"]
    names = {"served_over_compute_limit": "served / compute limit", "served_over_ceiling": "served / server ceiling",
             "ours_over_peer": "ours / stock peer"}
    for key, label in names.items():
        r = data["ratios"][key]
        other = f"; {r['against']} at {r['other_users']} users, p99 {_f(r['other_p99_ms'], 0)} ms" if "other_users" in r else f"; {r['against']}"
        lines.append(f"  {label:<24} {r['value']:6.3f}   (served {r['served_rps']:.0f} req/s at {r['served_users']} users, "
                     f"p99 {_f(r['served_p99_ms'], 0)} ms{other})")
    fastest = data["compute_limit"].get("fastest_any")
    if fastest and fastest["backend"] != data["compute_limit"]["backend"]:
        r = data["ratios"]["served_over_compute_limit"]
        lines.append(f"  {'served / fastest of all':<24} {r['served_rps'] / fastest['samples_per_s']:6.3f}   "
                     f"({fastest['backend']}, verified to a looser tolerance: {fastest['samples_per_s']:.0f}/s at batch "
                     f"{fastest['batch']}; not served by default)")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    cfg = data["serve_config"]
    limit = data["compute_limit"]
    out = [f"# Bench: {data['model']} ({data['created']}{', QUICK' if data['quick'] else ''})", "",
           f"Host: {data['host']['cpus']} CPUs ({data['host']['machine']}), Python {data['host']['python']}. "
           f"Served config: {cfg.get('minWorkers')} worker(s), batchSize {cfg.get('batchSize', 1)}, "
           f"maxBatchDelay {cfg.get('maxBatchDelay', 100)} ms, {data['compute']['threads']} intra-op thread(s).", "",
           "## Ratios", "", "| ratio | value | served req/s | at users | served p99 ms |", "|---|---:|---:|---:|---:|"]
    for key, r in data["ratios"].items():
        out.append(f"| {key.replace('_', ' ')} | {r['value']:.3f} | {r['served_rps']:.0f} | {r['served_users']} | "
                   f"{_f(r['served_p99_ms'], 0)} |")
    pre = data["compute"]["preprocess"]
    fastest = limit["fastest_any"]
    out += ["", f"Compute limit: {limit['samples_per_s']:,.0f} samples/s ({limit['backend']}, batch {limit['batch']}, "
                f"× {limit['workers']} worker(s)): the fastest backend that meets the model's parity tolerance."
                + ("" if fastest["backend"] == limit["backend"] else
                   f" Fastest of all, with a looser tolerance: {fastest['backend']}, {fastest['samples_per_s']:,.0f} "
                   f"samples/s at batch {fastest['batch']} (served / that: "
                   f"{data['ratios']['served_over_compute_limit']['served_rps'] / fastest['samples_per_s']:.3f})."), "",
            f"Preprocessing, in-process on one thread over {pre['payloads']} payloads of the load mix: "
            f"{pre['summary']}.", "", "## Load, per target and concurrency", "",
            "| target | users | req/s | p50 ms | p95 ms | p99 ms | failures | mean batch | loadgen cores | server cores |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for target, t in data["targets"].items():
        for s in t["steps"]:
            mark = " **best**" if s["users"] == t["best"]["users"] else ""
            out.append(f"| {target}{mark} | {s['users']} | {s['rps']:.1f} | {_f(s['p50_ms'], 0)} | {_f(s['p95_ms'], 0)} | "
                       f"{_f(s['p99_ms'], 0)} | {s['failures']} | {_f(s['breakdown']['mean_batch_size'])} | "
                       f"{s['loadgen_cores']:.2f} | {s['server_cores']:.2f} |")
    out += ["", "Load generator and server CPU are in cores (CPU seconds per second); the host has "
                f"{data['host']['cpus']}. A load generator near a full core means Locust, not the server, may bound the figure.",
            "", "## Where the time goes (served, from the handler's per-batch metrics and the frontend's)", "",
            "| users | mean batch | preprocess ms/batch | inference ms/batch | postprocess ms/batch | queue ms/request | "
            "frontend ms/request | batches by size |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in data["targets"]["served"]["steps"]:
        b = s["breakdown"]
        sizes = ", ".join(f"{k}:{v:.0f}" for k, v in b["batches_by_size"].items())
        out.append(f"| {s['users']} | {_f(b['mean_batch_size'])} | {_f(b['preprocess_ms_per_batch'], 2)} | "
                   f"{_f(b['inference_ms_per_batch'], 2)} | {_f(b['postprocess_ms_per_batch'], 2)} | "
                   f"{_f(b['queue_ms_per_request'], 2)} | {_f(b['frontend_ms_per_request'], 2)} | {sizes} |")
    table = data["compute"]["samples_per_s"]
    sizes = list(next(iter(table.values())))
    out += ["", f"## Compute limit: in-process samples/s ({data['compute']['threads']} thread(s), {data['compute']['device']})",
            "", "| backend | " + " | ".join(f"batch {n}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for backend, row in table.items():
        out.append(f"| {backend} | " + " | ".join(f"{row[n]:,.0f}" for n in sizes) + " |")
    out += ["", "Plots: throughput.png, latency.png, compute.png.", ""]
    return "\n".join(out)


def plot(data: dict[str, Any], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"served": ("tab:blue", "-"), "ceiling": ("tab:gray", "--"), "peer": ("tab:orange", ":")}

    def save(fig, ax, name: str, *, legend: dict | None = None, **axes) -> None:
        ax.set(xscale="log", yscale="log", **axes)
        ax.legend(**(legend or {}))
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, t in data["targets"].items():
        color, line = styles[target]
        ax.plot([s["users"] for s in t["steps"]], [s["rps"] for s in t["steps"]], marker="o", color=color,
                linestyle=line, label=target)
    ax.axhline(data["compute_limit"]["samples_per_s"], color="tab:red", linewidth=1, label="compute limit")
    save(fig, ax, "throughput.png", xlabel="concurrent clients", ylabel="requests/s",
         title=f"{data['model']}: throughput vs concurrency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, t in data["targets"].items():
        color, line = styles[target]
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ax.plot([s["users"] for s in t["steps"]], [s[f"{q}_ms"] for s in t["steps"]], color=color, linestyle=line,
                    marker=marker, label=f"{target} {q}")
    save(fig, ax, "latency.png", legend={"fontsize": 7, "ncol": 3}, xlabel="concurrent clients",
         ylabel="latency (ms)", title=f"{data['model']}: latency percentiles vs concurrency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend, row in data["compute"]["samples_per_s"].items():
        ax.plot([int(n) for n in row], list(row.values()), marker="o", label=backend)
    save(fig, ax, "compute.png", xlabel="batch size", ylabel="samples/s",
         title=f"{data['model']}: in-process throughput ({data['compute']['threads']} thread(s))")
