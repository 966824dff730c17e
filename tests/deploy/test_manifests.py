"""The deployment manifests, offline: rendered by kustomize, validated strictly, consistent with each other,
with the image and with the registry; the alert rules through promtool. Starts no server."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from serve_config.cluster import manifests as mf
from tests.deploy.runtime import container, probes
from tests.conftest import ROOT, SERVED

CONTAINERFILE = ROOT / "serve_config" / "cluster" / "image" / "Containerfile"
needs_schemas = pytest.mark.skipif(not (mf.SCHEMAS / "kserve").is_dir(),
                                   reason=f"KServe's CRD schemas are not at {mf.SCHEMAS}/kserve (a clone without "
                                          f"../shared); the KServe manifests cannot be validated here")


@pytest.fixture(scope="module")
def sets() -> dict[str, list[dict]]:
    return dict(mf.rendered())


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


@pytest.mark.parametrize("name", ["cpu", "gpu", "monitoring"])
def test_built_in_kinds_validate_strictly(sets, name):
    for doc in sets[name]:
        assert mf.validate_document(doc, None) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    if name != "monitoring":
        assert mf.check_references(sets[name]) == []
        assert {d["kind"] for d in sets[name]} >= {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy",
                                                   "HorizontalPodAutoscaler", "PrometheusRule"}


@needs_schemas
def test_kserve_kinds_validate_against_the_crd_schemas(sets):
    kinds = [d["kind"] for d in sets["kserve"]]
    assert kinds.count("ServingRuntime") == 1
    for doc in sets["kserve"]:
        assert mf.validate_document(doc, mf.SCHEMAS) == [], f"{doc['kind']}/{doc['metadata']['name']}"


@needs_schemas
def test_a_misspelt_field_fails_validation(sets):
    deployment = copy.deepcopy(one(sets["cpu"], "Deployment"))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    assert any("readinesProbe" in p for p in mf.validate_document(deployment, None))
    service = copy.deepcopy([d for d in sets["kserve"] if d["kind"] == "InferenceService"][0])
    service["spec"]["predictor"]["model"]["storageURI"] = service["spec"]["predictor"]["model"].pop("storageUri")
    assert any("storageURI" in p for p in mf.validate_document(service, mf.SCHEMAS))
    runtime = copy.deepcopy(one(sets["kserve"], "ServingRuntime"))
    runtime["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    assert any("readOnlyRootFileSystem" in p for p in mf.validate_document(runtime, mf.SCHEMAS))
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"  # a string where an integer belongs
    assert any("containerPort" in p for p in mf.validate_document(runtime, mf.SCHEMAS))


def test_a_selector_that_selects_nothing_is_caught(sets):
    docs = copy.deepcopy(sets["cpu"])
    one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
    one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] = "nothing"
    problems = mf.check_references(docs)
    assert any("PodDisruptionBudget" in p for p in problems) and any("HorizontalPodAutoscaler" in p for p in problems)


def test_an_inference_service_per_default_model_on_our_runtime(sets):
    runtime = one(sets["kserve"], "ServingRuntime")
    services = {d["metadata"]["name"]: d for d in sets["kserve"] if d["kind"] == "InferenceService"}
    assert set(services) == {spec.name for spec in SERVED}
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    for name, service in services.items():
        model = service["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"] and model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["storageUri"].rstrip("/").endswith(f"/{name}")


def test_pods_are_locked_down(sets):
    for doc in [one(sets["cpu"], "Deployment"), one(sets["gpu"], "Deployment"), one(sets["kserve"], "ServingRuntime")]:
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else {}
        context = {**pod.get("securityContext", {}), **container(doc)["securityContext"]}
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"] and not context.get("privileged")
        mounts = {m["mountPath"] for m in container(doc)["volumeMounts"]}
        assert mounts == {"/tmp", "/home/model-server/run"}  # the only writable paths (the image's WORKDIR and /tmp)
    deployment = one(sets["cpu"], "Deployment")
    env = {e["name"]: float(e["value"]) for e in container(deployment)["env"] if e["name"].endswith("_SECONDS")}
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > env["TS_DRAIN_SECONDS"] + env["TS_STOP_SECONDS"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_probes_are_the_same_commands_everywhere(sets):
    """The Deployment, the KServe runtime and the image's HEALTHCHECK run one probe script."""
    deployment, runtime = probes(one(sets["cpu"], "Deployment")), probes(one(sets["kserve"], "ServingRuntime"))
    assert deployment == runtime
    ready = deployment["readinessProbe"]
    assert ready[-1] == "ready" and deployment["startupProbe"] == ready
    assert deployment["livenessProbe"][-1] == "live"
    healthcheck = re.search(r"HEALTHCHECK .*?CMD (\[.*?\])", CONTAINERFILE.read_text(), re.S).group(1)
    assert yaml.safe_load(healthcheck) == ready


def test_the_hpa_scales_on_the_metric_the_adapter_serves(sets):
    hpa = one(sets["cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    rule = yaml.safe_load(one(sets["monitoring"], "ConfigMap")["data"]["config.yaml"])["rules"][0]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert "rate(" in rule["metricsQuery"]  # a rate: it returns to 0 when the load stops, so the HPA scales down
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_the_gpu_overlay_asks_for_a_gpu_and_the_cuda_image(sets):
    cpu, gpu = container(one(sets["cpu"], "Deployment")), container(one(sets["gpu"], "Deployment"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["image"].endswith("-cuda") and not cpu["image"].endswith("-cuda")
    assert {"name": "TS_NUMBER_OF_GPU", "value": "1"} in gpu["env"]


def assert_fenced(policy: dict) -> None:
    """Inference and metrics from named peers only, never management; egress to the cluster's DNS alone."""
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    reachable = {p["port"]: rule["from"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(reachable) == {8080, 7070, 8082}  # never the management ports 8081, 7071
    assert all(source for source in reachable.values())  # each from named peers only, never from anywhere
    egress = policy["spec"]["egress"]
    assert [sorted((p["port"], p["protocol"]) for p in rule["ports"]) for rule in egress] == [[(53, "TCP"), (53, "UDP")]]
    # To kube-system's resolver, as rendered: no podSelector that kustomize's common labels could have narrowed.
    assert [rule["to"] for rule in egress] == [[{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}}}]]


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_the_network_policy_fences_management_metrics_and_egress(sets, name):
    assert_fenced(one(sets[name], "NetworkPolicy"))


def test_the_kserve_predictors_are_fenced_like_the_deployment(sets):
    """KServe's predictor pods (labelled with their InferenceService and component: predictor) get the same
    policy, and it selects the predictor of every InferenceService, on the ports the runtime serves."""
    policy = one(sets["kserve"], "NetworkPolicy")
    assert mf.validate_document(policy, None) == []
    assert_fenced(policy)
    services = [d["metadata"]["name"] for d in sets["kserve"] if d["kind"] == "InferenceService"]
    selector = policy["spec"]["podSelector"]
    for service in services:
        labels = {"serving.kserve.io/inferenceservice": service, "component": "predictor"}
        assert mf.selects(selector, labels), service
    assert not mf.selects(selector, {"serving.kserve.io/inferenceservice": services[0], "component": "transformer"})
    runtime = one(sets["kserve"], "ServingRuntime")
    served = {p["containerPort"] for c in runtime["spec"]["containers"] for p in c.get("ports", [])}
    assert served <= {8080, 7070}


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory):
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: apt-get install prometheus (make prereqs)")
    out = tmp_path_factory.mktemp("rules")
    mf.write_rules(out)
    return out


def test_alert_rules_pass_promtool_check(rules_dir):
    answer = subprocess.run(["promtool", "check", "rules", "rules.yaml"], cwd=rules_dir, capture_output=True, text=True)
    assert answer.returncode == 0 and "SUCCESS: 5 rules found" in answer.stdout, answer.stdout + answer.stderr


def test_alert_rules_pass_their_unit_tests(rules_dir):
    answer = subprocess.run(["promtool", "test", "rules", "rules_test.yaml"], cwd=rules_dir, capture_output=True,
                            text=True)
    assert answer.returncode == 0 and "SUCCESS" in answer.stdout, answer.stdout + answer.stderr


def test_promtool_unit_tests_catch_a_broken_rule(rules_dir, tmp_path):
    rules = yaml.safe_load((rules_dir / "rules.yaml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule["expr"] = rule["expr"].replace("> 0.05", "> 0.5").replace("> 100", "> 1000")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(rules_dir / "rules_test.yaml", tmp_path)
    answer = subprocess.run(["promtool", "test", "rules", "rules_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert answer.returncode != 0 and "TorchServeHigh5xxRate" in answer.stdout + answer.stderr
