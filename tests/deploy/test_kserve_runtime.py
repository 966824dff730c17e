"""The KServe bundle served by TorchServe started exactly as the ServingRuntime starts it (tests/deploy/runtime.py),
the manifests' probes run as commands against it, a real Prometheus scraping it, and its drain on SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import requests
import yaml

from loadtest.payloads import payloads
from serve_config.cluster import bundle as bd
from serve_config.cluster import manifests as mf
from tests.conftest import CLASSIFIERS, SERVED, TREE, Traffic, assert_serves_every_model, built
from tests.deploy import runtime as rt

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace for the pod's file system "
                                 "needs root (CI runs as root); the container tier covers it with podman")]


def tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    for spec in SERVED:
        built(TREE.archive(spec.name))
    out = bd.write_bundle(tmp_path_factory.mktemp("bundle") / "all", [s.name for s in SERVED], TREE.model_store)
    return out


@pytest.fixture(scope="module")
def served(bundle, tmp_path_factory):
    before = tree_digest(bundle)
    runtime = rt.start(rt.manifest("kserve", "ServingRuntime"), bundle, tmp_path_factory.mktemp("pod") / "pod.log")
    try:
        answer = runtime.wait_until(rt.probes(rt.manifest("kserve", "ServingRuntime"))["startupProbe"], timeout=300)
        assert answer.returncode == 0, f"{answer.stdout}\n{runtime.tail()}"
        yield runtime
    finally:
        runtime.stop()
    assert tree_digest(bundle) == before  # a read-only mount: nothing in the bundle changed


def test_the_bundle_is_what_kserve_expects(bundle):
    assert sorted(p.name for p in (bundle / "model-store").iterdir()) == sorted(f"{s.name}.mar" for s in SERVED)
    config = dict(line.split("=", 1) for line in (bundle / bd.CONFIG).read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    assert config["inference_address"] == "http://0.0.0.0:8080"  # the port the runtime declares
    assert config["model_store"] == "/mnt/models/model-store" and config["enable_envvars_config"] == "true"
    snapshot = json.loads(config["model_snapshot"])
    assert snapshot["modelCount"] == len(SERVED)
    for spec in SERVED:
        yaml_config = yaml.safe_load((bd.TEMPLATE.parent / f"{spec.name}.yaml").read_text())
        (version, entry), = snapshot["models"][spec.name].items()
        assert entry["marName"] == f"{spec.name}.mar" and entry["defaultVersion"] is True
        assert {k: entry[k] for k in bd.SNAPSHOT_KEYS} == {k: yaml_config[k] for k in bd.SNAPSHOT_KEYS}


def test_the_runtime_serves_every_model_from_the_read_only_bundle(served):
    assert_serves_every_model(served.inference_url)
    # The snapshot's settings are what TorchServe runs with: workers and batch size of each model-config YAML.
    for spec in SERVED:
        described = requests.get(f"{served.management_url}/models/{spec.name}", timeout=10).json()[0]
        config = yaml.safe_load((bd.TEMPLATE.parent / f"{spec.name}.yaml").read_text())
        assert (described["minWorkers"], described["batchSize"]) == (config["minWorkers"], config["batchSize"])
    # Token authorization is off in the pod (the gateway authenticates: docs/deploy.md). The Open Inference
    # Protocol route answers as /predictions does: KServe's clients call it.
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    native = requests.post(f"{served.inference_url}/predictions/{spec.name}", data=sample.body, timeout=30,
                           headers={"Content-Type": sample.content_type}).json()
    answer = requests.post(f"{served.inference_url}/v2/models/{spec.name}/infer", timeout=30, json={"inputs": [
        {"name": spec.inputs[0].name, "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(sample.body).decode()]}]})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    assert outputs["index"] == [p["index"] for p in native]


@pytest.mark.parametrize("source", ["kserve", "cpu"])
def test_the_manifests_probes_pass_when_ready_and_fail_when_a_model_has_no_worker(served, source):
    commands = rt.probes(rt.manifest("kserve", "ServingRuntime") if source == "kserve" else rt.manifest("cpu", "Deployment"))
    for name, command in commands.items():
        answer = served.exec(command)
        assert answer.returncode == 0, (name, answer.stdout, answer.stderr)
    model = SERVED[0].name
    config = yaml.safe_load((bd.TEMPLATE.parent / f"{model}.yaml").read_text())
    rt.scale(served, model, 0)
    try:
        answer = served.exec(commands["readinessProbe"])
        assert answer.returncode == 1 and f"no loaded worker for {model}" in answer.stdout, answer.stdout
        assert served.exec(commands["startupProbe"]).returncode == 1
        assert served.exec(commands["livenessProbe"]).returncode == 0  # the frontend is alive: no restart
    finally:
        rt.scale(served, model, config["minWorkers"])
    assert served.exec(commands["readinessProbe"]).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.ConnectionError:
        return False


def test_prometheus_scrapes_torchserve_and_evaluates_the_hpa_query_and_the_alerts(served, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus not found: apt-get install prometheus (make prereqs)")
    mf.write_rules(tmp_path)
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": "torchserve", "static_configs": [
            {"targets": [served.metrics_url.split("//")[1]], "labels": {"namespace": "ml", "pod": "torchserve-0"}}]}]}))
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
                                  start_new_session=True)
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list:
        answer = requests.get(f"{api}/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    try:
        # Waits below are bounded generously (a loaded host), and each ends as soon as its condition holds.
        deadline = time.monotonic() + 120
        while not ready(f"http://127.0.0.1:{port}/-/ready"):
            assert prometheus.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        adapter = yaml.safe_load(mf.render(mf.EXTRA["monitoring"])[0]["data"]["config.yaml"])["rules"][0]
        hpa_query = (adapter["metricsQuery"].replace("<<.Series>>", "ts_queue_latency_microseconds")
                     .replace("<<.LabelMatchers>>", 'namespace="ml",pod=~"torchserve-0"').replace("<<.GroupBy>>", "pod"))
        deadline, value = time.monotonic() + 120, None
        with Traffic(served.inference_url, SERVED[0].name):  # requests over many scrapes: counters grow between them
            while time.monotonic() < deadline:
                if result := query(hpa_query):
                    assert len(result) == 1 and result[0]["metric"] == {"pod": "torchserve-0"}, result
                    value = float(result[0]["value"][1])
                    if value > 0:
                        break
                time.sleep(1)
        assert value is not None and math.isfinite(value) and value > 0, (  # requests queued: a positive rate
            f"the HPA query gave {value} after 120 s of traffic and 1 s scrapes")
        print(f"\nHPA metric {adapter['name']['as']} = {value:.6f} ({hpa_query})")
        # Every metric the alerts use is really exported, and Prometheus evaluates each rule without error.
        names = {r["metric"]["__name__"] for r in query(
            'count by (__name__) ({__name__=~"WorkerLoadTime|Requests2XX|PredictionTime|'
            'ts_queue_latency_microseconds|ts_inference_requests_total"})')}
        assert names == {"WorkerLoadTime", "Requests2XX", "PredictionTime", "ts_queue_latency_microseconds",
                         "ts_inference_requests_total"}
        deadline = time.monotonic() + 60
        while True:
            rules = [r for g in requests.get(f"{api}/rules", timeout=10).json()["data"]["groups"] for r in g["rules"]]
            evaluated = len(rules) == 5 and all(not r["lastEvaluation"].startswith("0001") for r in rules)
            if evaluated or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert evaluated and {r["health"] for r in rules} == {"ok"}, rules
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)


def test_token_authorization_on_in_the_pod_probes_still_work(tmp_path):
    """TS_DISABLE_TOKEN_AUTHORIZATION=false turns keys back on (enable_envvars_config); the probes read them from
    the key file TorchServe writes to its working directory."""
    model = SERVED[0].name
    bundle = bd.write_bundle(tmp_path / "bundle", [model], TREE.model_store)
    runtime = rt.start(rt.manifest("kserve", "ServingRuntime"), bundle, tmp_path / "pod.log",
                       extra_env={"TS_DISABLE_TOKEN_AUTHORIZATION": "false"})
    try:
        commands = rt.probes(rt.manifest("kserve", "ServingRuntime"))
        answer = runtime.wait_until(commands["startupProbe"], timeout=240)
        assert answer.returncode == 0, f"{answer.stdout}\n{runtime.tail()}"
        assert runtime.exec(commands["livenessProbe"]).returncode == 0
        sample = payloads(model, 1)[0]
        refused = requests.post(f"{runtime.inference_url}/predictions/{model}", data=sample.body, timeout=30)
        assert 400 <= refused.status_code < 500 and "Token Authorization failed" in refused.text  # 0.12 says 400
        keys = json.loads(runtime.exec(["cat", "key_file.json"]).stdout)
        allowed = requests.post(f"{runtime.inference_url}/predictions/{model}", data=sample.body, timeout=30,
                                headers={"Authorization": f"Bearer {keys['inference']['key']}",
                                         "Content-Type": sample.content_type})
        assert allowed.status_code == 200, allowed.text
    finally:
        runtime.stop()


def test_sigterm_drains_then_stops(served):
    """What `docker stop` or a pod deletion does: readiness fails at once while requests are still answered for
    TS_DRAIN_SECONDS, then TorchServe stops and the entrypoint exits 0. Last in this module: it stops the server."""
    drain = float(served.env["TS_DRAIN_SECONDS"])
    ready = rt.probes(rt.manifest("kserve", "ServingRuntime"))["readinessProbe"]
    with Traffic(served.inference_url, SERVED[0].name) as traffic:
        time.sleep(1)
        started = time.monotonic()
        os.kill(served.process.pid, signal.SIGTERM)
        time.sleep(1)
        answer = served.exec(ready)
        assert answer.returncode == 1 and "draining" in answer.stdout, answer.stdout
        not_ready_at = time.monotonic()
        # Bounded generously (the entrypoint's own limits plus a loaded host's slack), not timed.
        served.process.wait(timeout=drain + float(served.env["TS_STOP_SECONDS"]) + 60)
        took = time.monotonic() - started
    assert served.process.returncode == 0, served.tail()
    assert took >= drain - 0.5
    assert 200 in traffic.answered_after(not_ready_at), "nothing was answered while draining"
    statuses = traffic.statuses
    assert traffic.answered and set(traffic.answered) == {200}, sorted(set(map(str, statuses)))
    if "refused" in statuses:  # once refused (stopped), never answered again
        assert set(statuses[statuses.index("refused"):]) == {"refused"}
    assert "stop requested: draining" in served.log.read_text()
