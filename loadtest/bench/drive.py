"""The bench's load generator: real Locust, run as a library, through a plan of closed-loop steps.

    python -m loadtest.bench.drive --plan plan.json --out steps.json

A plan (loadtest.bench.records.Plan, as JSON: records.run writes it and starts this) names the server (URL,
tokens, metrics URL, its PID) and a list of steps: which served model (endpoint) to call, with how many concurrent
users, for how long after a warm-up (at least; a step also waits for `min_requests` answers, one per user by
default, up to `max_seconds`). One Locust process runs every step, so no step pays Locust's start-up. A target's
form (loadtest.payloads.FORMS, native by default) says how the payloads are sent: natively, or as Open Inference
Protocol infer requests. Per step it records (records.StepResult) what Locust saw (requests/s, p50/p95/p99, failures), what the server's /metrics counters moved
by (handler batches and stage times, frontend queue time) and the CPU seconds used by the load generator
and by the server.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from locust.env import Environment  # noqa: E402

from loadtest.bench import prometheus  # noqa: E402
from loadtest.bench.records import Plan, Step, StepResult  # noqa: E402
from loadtest.payloads import payloads  # noqa: E402
from loadtest.procs import tree_cpu_seconds  # noqa: E402
from locust import constant, constant_throughput  # noqa: E402

from loadtest.users import InferenceUser, rejected_count  # noqa: E402


class BenchUser(InferenceUser):
    """Endpoint, payloads and token are set from the plan before each step."""


def settled_scrape(metrics_url: str, model: str, headers: dict, tries: int = 20) -> dict[str, float]:
    """Scrape after the load stopped, once the last batches' counter lines have reached /metrics.

    The worker logs a batch's counters as separate lines that the frontend parses on its own time, so a
    scrape can see part of a batch; two equal scrapes in a row mean nothing more is on its way.
    """
    last = prometheus.scrape(metrics_url, model, headers)
    for _ in range(tries):
        gevent.sleep(0.1)
        now = prometheus.scrape(metrics_url, model, headers)
        if now == last:
            break
        last = now
    return last


def run_step(env: Environment, plan: Plan, forms: dict[str, list], step: Step) -> StepResult:
    """One step: closed loop (each user sends as soon as its answer is back), or, with a rate (req/s in all),
    open pacing: each user at rate/users requests per second."""
    endpoint = step.target.endpoint
    BenchUser.endpoint = endpoint
    BenchUser.payloads = forms[step.target.form]
    BenchUser.wait_time = constant_throughput(step.rate / step.users) if step.rate else constant(0)
    runner = env.create_local_runner()
    runner.start(step.users, spawn_rate=max(step.users, 1))
    gevent.sleep(step.warmup)
    headers = {"Authorization": f"Bearer {plan.management_token}"}
    before = prometheus.scrape(plan.metrics_url, endpoint, headers)
    env.stats.reset_all()
    cpu0, server0, wall0 = time.process_time(), tree_cpu_seconds(plan.server_pid), time.perf_counter()
    gevent.sleep(step.seconds)
    # A step measures for its seconds and until `min_requests` answers came (by default one per user): on a
    # loaded host a window of fixed length can close before a heavy target answers anything, and a rate over
    # no answer says nothing. Bounded by `max_seconds`; the figures are per the real wall time.
    while env.stats.total.num_requests < step.wanted and time.perf_counter() - wall0 < step.max_seconds:
        gevent.sleep(0.05)
    stats = env.stats.total
    wall = time.perf_counter() - wall0
    requests_done, failures = stats.num_requests, stats.num_failures
    percentiles = {f"p{q}_ms": float(stats.get_response_time_percentile(q / 100)) if requests_done else float("nan")
                   for q in (50, 95, 99)}
    load_cpu, server_cpu = time.process_time() - cpu0, tree_cpu_seconds(plan.server_pid) - server0
    runner.quit()
    after = settled_scrape(plan.metrics_url, endpoint, headers)
    errors = tuple(f"{e.method} {e.name}: {e.error} x{e.occurrences}" for e in env.stats.errors.values())[:5]
    return StepResult(
        step=step, wall_s=wall, requests=requests_done, failures=failures, rps=requests_done / wall,
        mean_ms=stats.avg_response_time, **percentiles,
        loadgen_cores=load_cpu / wall, server_cores=server_cpu / wall,
        # counters moved by warm-up tail and measurement alike: read as per-batch / per-request means
        server_metrics=prometheus.delta(after, before), errors=errors,
        rejected=rejected_count(env.stats.errors),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = Plan.from_json(json.loads(args.plan.read_text()))
    if not plan.host.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("load goes to loopback only")
    forms = {form: payloads(plan.payload_model, plan.samples, form)
             for form in sorted({step.target.form for step in plan.steps})}
    gevent.get_hub().loop.update_now()  # the loop's clock went stale while the payloads were built (locustfile.py)
    BenchUser.token = plan.inference_token
    results = []
    for step in plan.steps:
        env = Environment(user_classes=[BenchUser], host=plan.host)
        result = run_step(env, plan, forms, step)
        target = step.target
        label = target.endpoint + (f" ({target.form})" if target.form != "native" else "")
        print(f"  {label:<28} {step.users:>3} users: {result.rps:8.1f} req/s  p99 {result.p99_ms:6.0f} ms"
              f"  failures {result.failures}  loadgen {result.loadgen_cores:.2f} cores", flush=True)
        results.append(result.to_json())
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
