"""The bench harness in its quickest form (QUICK) against a real TorchServe: every section of the
report is there with finite figures. No timing is asserted: these machines are noisy."""

from __future__ import annotations

import json
import math

import pytest

from handlers.batch_metrics import STAGES
from loadtest.bench import bench
from loadtest.bench.report import TARGETS
from tests.conftest import SERVED, TREE

pytestmark = [pytest.mark.load, pytest.mark.integration, pytest.mark.proof]  # minutes: `make proofs`


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# The harness differs per kind (its workload, forms and peer), not per model: one served model of each kind drives
# it here (the first in the registry: digits also benches its INT8 backend); `make bench MODEL=<any>` runs the same
# code for the others.
ONE_PER_KIND = list({spec.kind: spec for spec in reversed(SERVED)}.values())[::-1]


@pytest.mark.parametrize("spec", ONE_PER_KIND, ids=lambda s: s.name)
def test_quick_bench_writes_a_complete_report(spec, tmp_path, capsys):
    report_dir = bench.bench(spec.name, quick=True, out_root=tmp_path, tree=TREE)
    data = json.loads((report_dir / "bench.json").read_text())

    table = data["compute"]["samples_per_s"]
    assert set(table) == {"eager", *spec.formats}
    assert all(_finite(v) and v > 0 for row in table.values() for v in row.values())
    assert _finite(data["compute_limit"]["samples_per_s"])
    assert _finite(data["compute"]["preprocess"]["ms_per_item"]) and data["compute"]["preprocess"]["summary"]

    workers = data["serve_config"].get("minWorkers", 1)
    for target in TARGETS:
        steps = data["targets"][target]["steps"]
        # the peer runs with one worker and with as many as ours; the others with ours
        counts = sorted({1, workers}) if target == "peer" else [workers]
        assert [(s["workers"], s["users"]) for s in steps] == [(n, u) for n in counts for u in bench.QUICK.levels]
        for s in steps:
            assert s["requests"] > 0 and s["failures"] == 0, s["errors"]
            for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "loadgen_cores", "server_cores"):
                assert _finite(s[key]) and s[key] >= 0, (target, key, s[key])
    for s in data["targets"]["served"]["steps"]:  # the handler's per-batch metrics reached /metrics
        b = s["breakdown"]
        assert b["batches"] > 0 and 1 <= b["mean_batch_size"] <= data["serve_config"]["batchSize"]
        assert all(_finite(b[f"{stage}_ms_per_batch"]) for stage in STAGES)
        assert _finite(b["queue_ms_per_request"])
        # the first scrape is taken under load, so one batch's counter lines can straddle it; the last one
        # waits for the counters to settle (drive.settled_scrape)
        assert abs(sum(b["batches_by_size"].values()) - b["batches"]) <= 1, b

    assert set(data["ratios"]) == {"served_over_compute_limit", "served_over_ceiling", "ours_over_peer"}
    assert all(_finite(r["value"]) and r["value"] > 0 for r in data["ratios"].values())
    assert [g["ratio"] for g in data["goals"]] == list(spec.bench.goals)
    for g in data["goals"]:
        assert all(_finite(g[k]) and g[k] > 0 for k in ("value", "cpu_allows", "cpu_allows_without_loadgen")), g
        assert g["cpu_allows_without_loadgen"] >= g["cpu_allows"]
    for target in TARGETS:
        cost = data["cpu_budget"][target]
        assert _finite(cost["server_ms"]) and cost["server_ms"] > 0 and _finite(cost["bound_rps"]), (target, cost)
    from models import registry

    forms = registry.resolve(spec.bench_workload).forms
    assert list(data["forms"]) == list(forms) and forms, "every request form of the model's workload was driven"
    for form, f in data["forms"].items():
        assert [s["users"] for s in f["steps"]] == list(bench.QUICK.levels)
        for s in f["steps"]:
            assert s["requests"] > 0 and s["failures"] == 0, (form, s["errors"])
            assert _finite(s["over_native"]) and s["over_native"] > 0
    # the registry's other serving backends, each served from its own archive at every level beside served
    assert list(data["backends"]) == list(spec.bench.backends)
    for backend, b in data["backends"].items():
        assert [s["users"] for s in b["steps"]] == list(bench.QUICK.levels)
        for s in b["steps"]:
            assert s["requests"] > 0 and s["failures"] == 0, (backend, s["errors"])
            assert _finite(s["over_native"]) and s["over_native"] > 0 and s["breakdown"]["batches"] > 0
        assert _finite(b["best_over_served_best"]) and b["best_over_served_best"] > 0
    report = (report_dir / "report.md").read_text()
    assert ("## Other serving backends" in report) == bool(spec.bench.backends)
    for section in ("## Ratios", "## Load, per target", "## Where the time goes", "## Request forms", "## Goals",
                    "## CPU per request", "## Compute limit"):
        assert section in report
    for plot in ("throughput.png", "latency.png", "compute.png"):
        assert (report_dir / plot).read_bytes().startswith(b"\x89PNG")
    # the ratios print last: a header and three lines, plus one for a faster, looser variant (INT8) when measured
    fastest = data["compute_limit"]["fastest_any"]["backend"] != data["compute_limit"]["backend"]
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-5 if fastest else -4].startswith("ratios for")
    assert lines[-1].lstrip().startswith("served / fastest of all" if fastest else "ours / stock peer")
