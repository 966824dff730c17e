"""Pure parts of the bench: Prometheus parsing, per-step breakdowns, best-step choice, and the stock
peer's torchvision transforms computing the same tensor as our preset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from handlers.batch_metrics import BATCHES, REQUESTS, STAGE_MS
from loadtest.bench import prometheus
from loadtest.bench.records import Plan, Step, StepResult, Target
from loadtest.bench.report import assemble, best_step, breakdown, cpu_budget, goals, ratios_text
from models import registry
from models.preprocessing import PRESETS, decode_image
from models.samples import sample_digits

TEXT = """# HELP ts_inference_requests_total Total number of inference requests.
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="digits",model_version="default",hostname="h",} 40.0
ts_inference_requests_total{model_name="other",model_version="default",hostname="h",} 7.0
ts_queue_latency_microseconds{model_name="digits",model_version="default",hostname="h",} 80000.0
HandlerBatches{ModelName="digits",Level="Model",Hostname="h",} 4.0
HandlerBatchedRequests{ModelName="digits",Level="Model",Hostname="h",} 40.0
HandlerBatchesBySize{BatchSize="8",ModelName="digits",Level="Model",Hostname="h",} 1.0
HandlerBatchesBySize{BatchSize="16",ModelName="digits",Level="Model",Hostname="h",} 2.0
HandlerBatchesBySize{BatchSize="0",ModelName="digits",Level="Model",Hostname="h",} 1.0
HandlerPreprocessMs{ModelName="digits",Level="Model",Hostname="h",} 10.0
HandlerInferenceMs{ModelName="digits",Level="Model",Hostname="h",} 2.0
HandlerPostprocessMs{ModelName="digits",Level="Model",Hostname="h",} 1.0
"""


def test_model_counters_keep_one_model_and_split_batches_by_size():
    counters = prometheus.model_counters(TEXT, "digits")
    assert counters["ts_inference_requests_total"] == 40.0 and counters[BATCHES] == 4.0
    assert counters["HandlerBatchesBySize[16]"] == 2.0
    assert prometheus.model_counters(TEXT, "other") == {"ts_inference_requests_total": 7.0}
    assert prometheus.delta({"a": 5.0, "b": 1.0}, {"a": 2.0}) == {"a": 3.0, "b": 1.0}


def test_breakdown_turns_counter_deltas_into_means():
    b = breakdown(prometheus.model_counters(TEXT, "digits"))
    assert b["mean_batch_size"] == 10.0 and b["preprocess_ms_per_batch"] == 2.5
    assert b["inference_ms_per_batch"] == 0.5 and b["postprocess_ms_per_batch"] == 0.25
    assert b["queue_ms_per_request"] == 2.0
    assert list(b["batches_by_size"]) == ["0", "8", "16"]  # numeric order
    # a scrape between one batch's counter lines: BATCHES already counted it, REQUESTS not yet; the mean
    # batch size still comes out right, from the by-size lines that carry size and count together
    straddled = prometheus.delta(prometheus.model_counters(TEXT, "digits"), {BATCHES: 1.0})
    assert straddled[BATCHES] == 3.0 and straddled[REQUESTS] / straddled[BATCHES] > 13  # the naive mean is off
    assert breakdown(straddled)["mean_batch_size"] == 10.0
    empty = breakdown({})
    assert empty["mean_batch_size"] is None and empty["queue_ms_per_request"] is None
    assert set(STAGE_MS.values()) | {BATCHES, REQUESTS} <= set(prometheus.model_counters(TEXT, "digits"))


def result(target: str, users: int, rps: float, p99: float, *, failures: int = 0, workers: int = 2,
           backend: str | None = None, form: str = "native") -> StepResult:
    step = Step(Target(target, f"m-{target}", workers, backend=backend, form=form), users, warmup=0.5, seconds=2.0)
    return StepResult(step, wall_s=2.0, requests=100, failures=failures, rps=rps, mean_ms=p99 / 2, p50_ms=p99 / 2,
                      p95_ms=p99, p99_ms=p99, loadgen_cores=0.2, server_cores=1.5)


def test_best_step_respects_the_p99_budget_and_failures():
    steps = [result("served", 1, 100, 5), result("served", 4, 300, 20), result("served", 16, 500, 80),
             result("served", 64, 900, 30, failures=3)]
    best, within = best_step(steps, 50)
    assert best.users == 4 and within
    over, _ = best_step(steps, 10)  # nothing but users=1 within 10 ms
    assert over.users == 1
    none_within, within = best_step([result("served", 1, 100, 60), result("served", 4, 300, 90)], 50)
    assert none_within.users == 4 and not within


def test_a_plan_and_its_results_cross_the_process_boundary_as_the_same_records():
    plan = Plan("http://127.0.0.1:1", "http://127.0.0.1:2", 42, "i", "m", "digits",
                steps=(Step(Target("peer", "digits-peer-w2", 2), 16, 1.0, 8.0),
                       Step(Target("oip", "digits", form="oip"), 4, 0.5, 2.0, rate=30.0, min_requests=10)))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    measured = result("backend onnx", 4, 120.0, 30.0, backend="onnx")
    assert StepResult.from_json(json.loads(json.dumps(measured.to_json()))) == measured
    row = measured.flat()
    assert (row["target"], row["endpoint"], row["backend"], row["users"], row["rps"]) == \
        ("backend onnx", "m-backend onnx", "onnx", 4, 120.0)
    assert plan.steps[1].wanted == 10 and plan.steps[0].wanted == 16


@pytest.mark.parametrize("name", sorted(n for n, p in PRESETS.items() if hasattr(p, "torchvision_transforms")))  # image presets
def test_stock_peer_transforms_give_the_presets_tensor(name):
    preset = PRESETS[name]()
    for body, _label, sample in sample_digits(7):
        image = decode_image(body, max_pixels=10**8)
        expected, got = preset(image), preset.torchvision_transforms()(image)
        assert np.array_equal(expected, got.numpy()), sample
        assert not math.isnan(float(got.sum()))


def served_step(rps, server_cores, loadgen_cores, *, batch=10.0, preprocess_ms=5.0, p99=20.0):
    b = {"mean_batch_size": batch, "preprocess_ms_per_batch": preprocess_ms, "inference_ms_per_batch": 1.0,
         "postprocess_ms_per_batch": 0.5}
    return {"users": 16, "rps": rps, "p99_ms": p99, "server_cores": server_cores, "loadgen_cores": loadgen_cores,
            "within_p99_budget": p99 <= 50, "breakdown": b}


def test_cpu_budget_turns_cores_into_cost_per_request_and_the_rate_it_allows():
    targets = {"served": {"best": served_step(1000, 1.2, 0.8)}, "ceiling": {"best": served_step(4000, 1.0, 1.0)},
               "peer": {"best": served_step(500, 1.5, 0.3)}}
    budget = cpu_budget(2, targets, {"threads": 1, "best": {"samples_per_s": 50_000}}, workers=1)
    served = budget["served"]
    assert served["server_ms"] == pytest.approx(1.2) and served["loadgen_ms"] == pytest.approx(0.8)
    assert served["bound_rps"] == pytest.approx(1000) and served["server_bound_rps"] == pytest.approx(2000 / 1.2)
    assert budget["ceiling"]["total_ms"] == pytest.approx(0.5) and budget["ceiling"]["bound_rps"] == pytest.approx(4000)
    assert served["handler_ms"] == {"preprocess": 0.5, "inference": 0.1, "postprocess": 0.05}
    assert budget["compute_limit"]["ms_per_sample"] == pytest.approx(0.02)


def test_goals_are_met_only_within_the_p99_budget_and_say_what_the_cpu_allows():
    spec = registry.get("digits")
    assert set(spec.bench.goals) == {"served_over_ceiling", "ours_over_peer"}
    ratios = {"served_over_ceiling": {"value": 0.25, "denominator": 4000, "served_rps": 1000, "served_p99_ms": 20,
                                      "within_p99_budget": True},
              "ours_over_peer": {"value": 2.0, "denominator": 500, "served_rps": 1000, "served_p99_ms": 20,
                                 "within_p99_budget": True}}
    budget = {"served": {"bound_rps": 1000.0, "server_bound_rps": 1600.0}}
    got = {g["ratio"]: g for g in goals(spec, ratios, budget)}
    ceiling = got["served_over_ceiling"]  # ceiling 4000 req/s; served's cost allows 1000 (1600 without Locust)
    assert not ceiling["met"] and ceiling["cpu_allows"] == pytest.approx(0.25)
    assert ceiling["cpu_allows_without_loadgen"] == pytest.approx(0.4)
    assert got["ours_over_peer"]["met"]
    ratios["ours_over_peer"]["within_p99_budget"] = False  # fast enough, but only past the latency budget
    assert not {g["ratio"]: g for g in goals(spec, ratios, budget)}["ours_over_peer"]["met"]


def test_bench_goals_must_name_a_reported_ratio():
    with pytest.raises(ValueError, match="bench.goals"):
        registry.ModelSpec(**{**registry.get("digits").__dict__,
                              "bench": registry.BenchSpec(goals={"served_over_nothing": 1.0})})


def test_bench_backends_must_be_other_verified_serving_backends():
    digits = registry.get("digits").__dict__
    assert registry.get("shapes").bench.backends == ("onnx",) and registry.get("digits").bench.backends == ("onnx-int8",)
    for wrong in (("onnx",), ("tensorrt",), ("aoti-cuda",)):
        with pytest.raises(ValueError, match="bench.backends"):
            registry.ModelSpec(**{**digits, "bench": registry.BenchSpec(backends=wrong)})
    with pytest.raises(ValueError, match="bench.backends"):  # a backend whose format the model does not export
        registry.ModelSpec(**{**registry.get("cancer").__dict__, "bench": registry.BenchSpec(backends=("onnx-int8",))})


def test_other_backends_are_compared_with_served_per_level_and_at_each_best():
    spec = registry.get("shapes")  # p99 budget 1000 ms

    run = result
    steps = [run("served", 4, 100.0, 80), run("served", 16, 150.0, 400),
             run("backend onnx-int8", 4, 150.0, 60, backend="onnx-int8"),
             run("backend onnx-int8", 16, 300.0, 1500, backend="onnx-int8"),  # faster, but past the p99 budget
             run("oip-bytes", 4, 90.0, 90, form="oip-bytes"), run("oip-bytes", 16, 120.0, 500, form="oip-bytes"),
             run("ceiling", 4, 400.0, 20), run("ceiling", 16, 500.0, 60), run("peer", 4, 50.0, 300)]
    compute = {"threads": 1, "device": "cpu", "best": {"samples_per_s": 80.0, "backend": "onnx", "batch": 16},
               "preprocess": {"payloads": 1, "summary": "-"}, "samples_per_s": {"onnx": {1: 50.0, 16: 80.0}}}
    data = assemble(spec, {"minWorkers": 2}, compute, steps, quick=True)
    int8 = data["backends"]["onnx-int8"]
    assert [s["over_native"] for s in int8["steps"]] == [1.5, 2.0]
    assert int8["best"]["users"] == 4 and int8["best_over_served_best"] == pytest.approx(1.0)  # 150 at 4 vs 150 at 16
    assert list(data["forms"]) == ["oip-bytes"] and "onnx-int8" not in data["forms"]
    assert data["forms"]["oip-bytes"]["at_served_best"]["over_native"] == pytest.approx(0.8)
    assert "onnx-int8 / served" in ratios_text(data)
