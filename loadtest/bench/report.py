"""The bench report: one JSON of every figure, a Markdown summary, PNG plots, and the ratios printed last."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from handlers.batch_metrics import BATCHES, BATCHES_BY_SIZE, REQUESTS, STAGE_MS, STAGES
from loadtest.bench.records import StepResult
from models.registry import BENCH_RATIOS

TARGETS = ("served", "ceiling", "peer")
RATIO_LABELS = dict(zip(BENCH_RATIOS, ("served / compute limit", "served / server ceiling", "ours / stock peer"),
                        strict=True))


def quantile(values, q: float) -> float:
    """The `q` quantile of `values` (nearest rank): what the benches print as p50 and p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def breakdown(metrics: dict[str, float]) -> dict[str, Any]:
    """Where the time went during one step, from the /metrics deltas: per batch and per request means.

    The worker logs a batch's counters as separate lines, so a scrape taken under load can fall between
    them. The mean batch size therefore comes from `HandlerBatchesBySize`, whose every line carries a size
    and its count together; requests / batches is the fallback when it is missing."""
    batches, handled = metrics.get(BATCHES, 0.0), metrics.get(REQUESTS, 0.0)
    frontend_requests = metrics.get("ts_inference_requests_total", 0.0)
    prefix = BATCHES_BY_SIZE + "["
    by_size = {k[len(prefix):-1]: v for k, v in sorted(metrics.items(), key=lambda kv: _size(kv[0]))
               if k.startswith(prefix) and v > 0}
    sized = sum(by_size.values())
    mean = (sum(int(size) * count for size, count in by_size.items()) / sized if sized
            else handled / batches if batches else None)
    out: dict[str, Any] = {"batches": batches, "mean_batch_size": mean}
    for stage, name in STAGE_MS.items():
        out[f"{stage}_ms_per_batch"] = metrics[name] / batches if batches and name in metrics else None
    for key, name in (("queue_ms_per_request", "ts_queue_latency_microseconds"),
                      ("frontend_ms_per_request", "ts_inference_latency_microseconds")):
        out[key] = metrics[name] / frontend_requests / 1000 if frontend_requests and name in metrics else None
    out["batches_by_size"] = by_size
    return out


def _workers(n: int | None) -> str:
    return "workers ?" if n is None else f"{n} worker{'s' if n != 1 else ''}"


def series(rows: list[dict]) -> dict[str, list[dict]]:
    """A target's report rows split by worker count (the peer runs with more than one), each in level order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_workers(row.get("workers")), []).append(row)
    return groups


def _size(key: str) -> int:
    digits = "".join(c for c in key if c.isdigit())
    return int(digits) if digits else 0


def best_step(results: list[StepResult], p99_budget_ms: float) -> tuple[StepResult, bool]:
    """The step with the most requests/s among those without failures and within the p99 budget; if none meets
    the budget, the fastest without failures, else the fastest of all; and whether it is within the budget."""
    clean = [r for r in results if r.clean]
    within = [r for r in clean if r.p99_ms <= p99_budget_ms]
    best = max(within or clean or results, key=lambda r: r.rps)
    return best, any(r is best for r in within)


def row(result: StepResult, **extra: Any) -> dict[str, Any]:
    """A step's row in the report document: its target's and step's fields, its figures, and where the server's
    time went (breakdown)."""
    return {**result.flat(), "breakdown": breakdown(result.server_metrics), **extra}


def cpu_per_request(step: dict) -> dict[str, float]:
    """CPU milliseconds one request cost during `step`: all TorchServe processes', the load generator's, both."""
    rps = step["rps"]
    server = step["server_cores"] * 1000 / rps if rps else math.nan
    loadgen = step["loadgen_cores"] * 1000 / rps if rps else math.nan
    return {"server_ms": server, "loadgen_ms": loadgen, "total_ms": server + loadgen}


def cpu_budget(cpus: int, targets: dict[str, Any], compute: dict, workers: int) -> dict[str, Any]:
    """What each target's best step cost in CPU per request, and the most requests/s those costs allow on
    `cpus` cores: with the load generator on this host (`bound_rps`), and with it elsewhere (`server_bound_rps`).

    The served target adds its handler's stages per request (wall ms per batch / mean batch size; a worker's
    stages run on its intra-op threads). The compute limit's own cost is its threads' time per sample."""
    out: dict[str, Any] = {"cpus": cpus}
    for target, t in targets.items():
        best = t["best"]
        cost = cpu_per_request(best)
        out[target] = {**cost, "rps": best["rps"], "users": best["users"],
                       "bound_rps": cpus * 1000 / cost["total_ms"] if cost["total_ms"] > 0 else math.inf,
                       "server_bound_rps": cpus * 1000 / cost["server_ms"] if cost["server_ms"] > 0 else math.inf}
    b = targets["served"]["best"]["breakdown"]
    size = b["mean_batch_size"]
    per_batch = {stage: b[f"{stage}_ms_per_batch"] for stage in STAGES}
    out["served"]["handler_ms"] = {stage: ms / size if size and ms is not None else None for stage, ms in per_batch.items()}
    per_worker = compute["best"]["samples_per_s"]
    out["compute_limit"] = {"ms_per_sample": compute["threads"] * 1000 / per_worker if per_worker else math.nan,
                            "workers": workers, "threads": compute["threads"]}
    return out


def goals(spec, ratios: dict[str, Any], budget: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of the model's bench goals: met (value at least the goal, served p99 within budget) or not, and
    the ratio the measured CPU cost per served request allows on this host (`cpu_allows`): the most that
    cost lets served reach, over the same denominator."""
    out = []
    served = budget["served"]
    for name, goal in spec.bench.goals.items():
        r = ratios[name]
        denominator = r["denominator"]
        out.append({"ratio": name, "goal": goal, "value": r["value"], "served_p99_ms": r["served_p99_ms"],
                    "within_p99_budget": r["within_p99_budget"],
                    "met": bool(r["value"] >= goal and r["within_p99_budget"]),
                    "cpu_allows": served["bound_rps"] / denominator if denominator else math.nan,
                    "cpu_allows_without_loadgen": served["server_bound_rps"] / denominator if denominator else math.nan})
    return out


def assemble(spec, settings: dict, compute: dict, steps: list[StepResult], *, quick: bool) -> dict[str, Any]:
    """The report document (bench.json) of one run: `steps` as loadtest.bench.drive measured them."""
    workers = int(settings.get("minWorkers", 1))
    limit = compute["best"]["samples_per_s"] * workers
    budget_ms = spec.bench.p99_ms
    targets, best = {}, {}
    for target in TARGETS:
        mine = [r for r in steps if r.target.target == target]
        best[target], within = best_step(mine, budget_ms)
        targets[target] = {"steps": [row(r) for r in mine], "best": row(best[target], within_p99_budget=within)}
    served, ceiling, peer = (best[t] for t in TARGETS)
    served_within = targets["served"]["best"]["within_p99_budget"]

    def ratio(denominator: float, against: str) -> dict[str, Any]:
        return {"value": served.rps / denominator if denominator else math.nan, "against": against,
                "denominator": denominator, "served_rps": served.rps, "served_users": served.users,
                "served_p99_ms": served.p99_ms, "within_p99_budget": served_within}

    ratios = {
        "served_over_compute_limit": ratio(limit, f"compute limit {limit:.0f}/s"),
        "served_over_ceiling": {**ratio(ceiling.rps, "ceiling"), "other_users": ceiling.users,
                                "other_p99_ms": ceiling.p99_ms},
        "ours_over_peer": {**ratio(peer.rps, f"peer ({_workers(peer.target.workers)})"), "other_users": peer.users,
                           "other_p99_ms": peer.p99_ms},
    }
    budget = cpu_budget(os.cpu_count() or 1, targets, compute, workers)
    native = {r.users: r for r in steps if r.target.target == "served"}

    def variants(name_of) -> dict[str, Any]:
        """The served model's other request forms or other backends (`name_of(target)`: the variant's name, None
        for any other target), each level's req/s over the served default's in its native form at the same
        level, and the variant's own best."""
        out = {}
        for name in dict.fromkeys(name_of(r.target) for r in steps if r.target.target not in TARGETS):
            if name is None:
                continue
            mine = [r for r in steps if r.target.target not in TARGETS and name_of(r.target) == name]
            rows = [row(r, over_native=r.rps / native[r.users].rps if r.users in native and native[r.users].rps
                        else math.nan) for r in mine]
            top, within = best_step(mine, budget_ms)
            out[name] = {"steps": rows, "at_served_best": next((x for x in rows if x["users"] == served.users), None),
                         "best": row(top, within_p99_budget=within),
                         "best_over_served_best": top.rps / served.rps if served.rps else math.nan}
        return out
    return {
        "model": spec.name, "created": dt.datetime.now().isoformat(timespec="seconds"), "quick": quick,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "serve_config": settings, "p99_budget_ms": budget_ms,
        "compute": compute,
        "compute_limit": {"samples_per_s": limit, "workers": workers, **{k: compute["best"][k] for k in ("backend", "batch")},
                          "fastest_any": {**compute.get("fastest", compute["best"]),
                                          "samples_per_s": compute.get("fastest", compute["best"])["samples_per_s"] * workers}},
        "targets": targets,
        "ratios": ratios,
        "cpu_budget": budget,
        "goals": goals(spec, ratios, budget),
        "forms": variants(lambda target: target.form if target.form != "native" else None),
        "backends": variants(lambda target: target.backend),
    }


def write(data: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(data, indent=1, default=str))
    (directory / "report.md").write_text(markdown(data))
    plot(data, directory)


def _f(value: Any, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def goal_lines(data: dict[str, Any]) -> list[str]:
    """One line per goal: met or not, and what the measured CPU cost per served request allows."""
    lines = []
    for g in data["goals"]:
        verdict = "met" if g["met"] else ("NOT MET (p99 over budget)" if g["value"] >= g["goal"] else "NOT MET")
        lines.append(f"  {RATIO_LABELS[g['ratio']]:<24} {g['value']:6.3f} >= {g['goal']:g}: {verdict}; the CPU one served "
                     f"request costs here allows {g['cpu_allows']:.3f} ({g['cpu_allows_without_loadgen']:.3f} with the "
                     "load generator on another host)")
    return lines


def ratios_text(data: dict[str, Any]) -> str:
    lines = []
    if data.get("backends"):
        lines += [f"other backends of {data['model']} against the served one ({data['compute_limit']['backend']} "
                  "compute, registry serve_backend), each at its best concurrency:", *backend_lines(data)]
    if data.get("forms"):
        lines += [f"request forms of {data['model']} against the native one (req/s at the same concurrency):",
                  *form_lines(data)]
    if data["goals"]:
        lines += [f"goals for {data['model']} (registry bench.goals):", *goal_lines(data)]
    lines.append(f"ratios for {data['model']} (each target at its best concurrency, p99 budget {data['p99_budget_ms']:g} ms):")
    for key, label in RATIO_LABELS.items():
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


def backend_lines(data: dict[str, Any]) -> list[str]:
    """One line per other backend: its best req/s over served's best, and its req/s over served's by level."""
    lines = []
    served = data["targets"]["served"]["best"]
    for backend, b in data["backends"].items():
        best = b["best"]
        levels = ", ".join(f"{s['over_native']:.3f} at {s['users']}" for s in b["steps"])
        lines.append(f"  {backend + ' / served':<24} {b['best_over_served_best']:6.3f}   ({best['rps']:.0f} req/s at "
                     f"{best['users']} users, p99 {_f(best['p99_ms'], 0)} ms; served {served['rps']:.0f} req/s at "
                     f"{served['users']} users); by level: {levels}")
    return lines


def form_lines(data: dict[str, Any]) -> list[str]:
    """One line per request form: its req/s over native's at every level, the level of served's best first."""
    lines = []
    for form, f in data["forms"].items():
        best = f["at_served_best"]
        levels = ", ".join(f"{s['over_native']:.3f} at {s['users']}" for s in f["steps"])
        head = f"{best['over_native']:6.3f} at {best['users']} users ({best['rps']:.0f} req/s)" if best else "   –"
        lines.append(f"  {form + ' / native':<24} {head}; by level: {levels}")
    return lines


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
            mark = " **best**" if (s["users"], s.get("workers")) == (t["best"]["users"], t["best"].get("workers")) else ""
            out.append(f"| {target} ({_workers(s.get('workers'))}){mark} | {s['users']} | {s['rps']:.1f} | {_f(s['p50_ms'], 0)} | {_f(s['p95_ms'], 0)} | "
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
    if data.get("backends"):
        out += ["", "## Other serving backends (registry `bench.backends`: own archive, same config and handler)", "",
                "| backend | users | req/s | over served | p50 ms | p99 ms | failures | mean batch | inference ms/batch |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for backend, b in data["backends"].items():
            for s in b["steps"]:
                mark = " **best**" if s["users"] == b["best"]["users"] else ""
                out.append(f"| {backend}{mark} | {s['users']} | {s['rps']:.1f} | {_f(s['over_native'], 3)} | "
                           f"{_f(s['p50_ms'], 0)} | {_f(s['p99_ms'], 0)} | {s['failures']} | "
                           f"{_f(s['breakdown']['mean_batch_size'])} | {_f(s['breakdown']['inference_ms_per_batch'], 2)} |")
    out += ["", "## Request forms (the served model, same concurrency levels)", "",
            "Native: `/predictions/<model>` with the file's bytes. oip-bytes: `/v2/models/<model>/infer`, one BYTES row "
            "(base64 image, or the text). oip-pixels: the decoded image as a UINT8 tensor in the binary extension, "
            "outputs asked for in it too. "
            "oip-json: a tensor-kind model's infer request (also its native body) at the infer route.", "",
            "| form | users | req/s | over native | p99 ms | failures |", "|---|---:|---:|---:|---:|---:|"]
    for form, f in data.get("forms", {}).items():
        for s in f["steps"]:
            out.append(f"| {form} | {s['users']} | {s['rps']:.1f} | {_f(s['over_native'], 3)} | {_f(s['p99_ms'], 0)} | "
                       f"{s['failures']} |")
    out += cpu_markdown(data)
    table = data["compute"]["samples_per_s"]
    sizes = list(next(iter(table.values())))
    out += ["", f"## Compute limit: in-process samples/s ({data['compute']['threads']} thread(s), {data['compute']['device']})",
            "", "| backend | " + " | ".join(f"batch {n}" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for backend, row in table.items():
        out.append(f"| {backend} | " + " | ".join(f"{row[n]:,.0f}" for n in sizes) + " |")
    out += ["", "Plots: throughput.png, latency.png, compute.png.", ""]
    return "\n".join(out)


def cpu_markdown(data: dict[str, Any]) -> list[str]:
    """The goals, and the CPU each target's best step cost per request: why a goal is or is not in reach."""
    budget = data["cpu_budget"]
    out = ["", "## Goals", ""]
    if data["goals"]:
        out += ["| ratio | value | goal | met | served p99 ms | CPU cost allows | ... with Locust elsewhere |",
                "|---|---:|---:|---|---:|---:|---:|"]
        for g in data["goals"]:
            out.append(f"| {RATIO_LABELS[g['ratio']]} | {g['value']:.3f} | {g['goal']:g} | {'yes' if g['met'] else '**no**'} | "
                       f"{_f(g['served_p99_ms'], 0)} | {g['cpu_allows']:.3f} | {g['cpu_allows_without_loadgen']:.3f} |")
        out += ["", "*CPU cost allows*: the ratio served could reach if every core of the host did nothing but serve at "
                    "the CPU cost per request measured for served at its best step (server plus load generator; then "
                    "server alone). A goal above it cannot be met on this host without making each request cheaper."]
    else:
        out.append("The registry entry sets no `bench.goals`.")
    out += ["", f"## CPU per request (best step of each target; {budget['cpus']} cores)", "",
            "| target | req/s | at users | server CPU ms/request | load generator CPU ms/request | total | "
            "req/s the cost allows | ... with Locust elsewhere |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for target in TARGETS:
        c = budget[target]
        out.append(f"| {target} | {c['rps']:,.1f} | {c['users']} | {c['server_ms']:.3f} | {c['loadgen_ms']:.3f} | "
                   f"{c['total_ms']:.3f} | {c['bound_rps']:,.0f} | {c['server_bound_rps']:,.0f} |")
    handler = budget["served"]["handler_ms"]
    limit = budget["compute_limit"]
    out += ["", "Served, per request inside the handler: " + ", ".join(f"{stage} {_f(handler[stage], 3)} ms"
                                                                  for stage in STAGES)
            + f". The compute limit's forward pass alone costs {limit['ms_per_sample']:.3f} ms of CPU per sample "
              f"({limit['threads']} thread(s) per worker)."]
    return out


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
        groups = series(t["steps"])
        for n, (workers, steps) in enumerate(groups.items()):
            ax.plot([s["users"] for s in steps], [s["rps"] for s in steps], marker="os"[n % 2], color=color,
                    linestyle=line, alpha=1.0 if n == len(groups) - 1 else 0.5,
                    label=target if len(groups) == 1 else f"{target} ({workers})")
    for n, (backend, b) in enumerate(data.get("backends", {}).items()):
        ax.plot([s["users"] for s in b["steps"]], [s["rps"] for s in b["steps"]], marker="^",
                color=("tab:green", "tab:purple", "tab:brown")[n % 3], linestyle="-.", label=f"served on {backend}")
    ax.axhline(data["compute_limit"]["samples_per_s"], color="tab:red", linewidth=1, label="compute limit")
    save(fig, ax, "throughput.png", xlabel="concurrent clients", ylabel="requests/s",
         title=f"{data['model']}: throughput vs concurrency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for target, t in data["targets"].items():
        color, line = styles[target]
        steps = series(t["steps"]).get(_workers(t["best"].get("workers")), t["steps"])  # the peer: its better worker count
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ax.plot([s["users"] for s in steps], [s[f"{q}_ms"] for s in steps], color=color, linestyle=line,
                    marker=marker, label=f"{target} {q}")
    save(fig, ax, "latency.png", legend={"fontsize": 7, "ncol": 3}, xlabel="concurrent clients",
         ylabel="latency (ms)", title=f"{data['model']}: latency percentiles vs concurrency")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend, row in data["compute"]["samples_per_s"].items():
        ax.plot([int(n) for n in row], list(row.values()), marker="o", label=backend)
    save(fig, ax, "compute.png", xlabel="batch size", ylabel="samples/s",
         title=f"{data['model']}: in-process throughput ({data['compute']['threads']} thread(s))")
