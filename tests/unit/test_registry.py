"""The registry and the checked-in serving config agree, for every model."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from models import kinds
from models import registry
from models.paths import model_config_values
from serve_config.control import read_properties
from tests.conftest import ROOT, SERVED

ALL = list(registry.REGISTRY.values())


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_entry_round_trips_and_resolves(spec):
    assert registry.ModelSpec.from_json(spec.to_json()) == spec
    assert callable(registry.resolve(spec.builder))
    assert (ROOT / spec.handler).exists() and (ROOT / spec.bench.peer_handler).exists()
    assert callable(registry.resolve(spec.bench_workload))
    assert len(spec.labels) == spec.builder_kwargs.get("num_classes", len(spec.labels))


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_model_config_yaml_matches_the_registry(spec):
    config = model_config_values(spec.name)
    assert 1 <= config["minWorkers"] <= config["maxWorkers"]
    assert 1 <= config["batchSize"] <= max(spec.verify_batch_sizes), "serve only batch sizes that were verified"
    assert 0 <= config["maxBatchDelay"] <= 100 and config["responseTimeout"] >= 1
    settings = kinds.load(spec.kind).Settings.from_mapping(config["handler"])
    assert settings.rows_per_pass <= max(spec.verify_batch_sizes), "a forward pass larger than verified"
    assert 1 <= getattr(settings, "topk", 1) <= max(len(spec.labels), 1)
    # a larger answer would make the frontend drop the worker (with its batch) instead of the worker refusing it
    limit = int(read_properties(ROOT / "serve_config" / "config.properties")["max_response_size"])
    assert settings.max_answer_bytes <= limit


def test_config_properties_is_locked_down():
    props = read_properties(ROOT / "serve_config" / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    # Registration is on for `make deploy`, and so archives may come from the local model store only.
    assert props["disable_token_authorization"] == "false" and props["enable_model_api"] == "true"
    assert props["allowed_urls"] == "file://model_store/.*"
    assert props["metrics_mode"] == "prometheus" and int(props["token_expiration_min"]) >= 60
    for key in ("default_workers_per_model", "job_queue_size", "max_request_size", "number_of_netty_threads"):
        assert int(props[key]) > 0


def test_unknown_model_names_the_known_ones():
    with pytest.raises(KeyError, match="registered models: .*digits"):
        registry.get("nope")


def test_invalid_entries_fail_when_built():
    spec = registry.get("digits")
    with pytest.raises(ValueError, match="serve_backend"):
        registry.ModelSpec(**{**spec.__dict__, "serve_backend": "tensorrt"})
    with pytest.raises(ValueError, match="needs its format"):
        registry.ModelSpec(**{**spec.__dict__, "formats": ("trace",)})


def test_cli_is_what_the_makefile_reads():
    run = lambda *args: subprocess.run([sys.executable, "-m", "models.registry", *args], cwd=ROOT,
                                       capture_output=True, text=True)
    assert run("list", "--default").stdout.split() == [s.name for s in SERVED]
    assert run("get", "digits", "serve_backend").stdout.strip() == "onnx"
    assert run("get", "nope", "name").returncode == 2
    generators = run("list", "--generates").stdout.split()
    assert generators == list(registry.GENERATORS) and set(generators) <= set(run("list", "--tested").stdout.split())
    assert run("get", generators[0], "exporter").stdout.strip() == kinds.get("generate").exporter


@pytest.mark.parametrize("spec", list(registry.GENERATORS.values()), ids=lambda s: s.name)
def test_a_generator_entry_names_what_builds_and_serves_it(spec):
    assert callable(registry.resolve(spec.pretrained)) and (ROOT / spec.handler).exists()
    config = model_config_values(spec.config)
    assert config["continuousBatching"] is True
    kinds.load(spec.kind).Settings.from_mapping(config["handler"])
    assert registry.entry(spec.name) is spec and spec.to_json()["config"] == spec.config
    assert f"serve_config/{spec.config}.yaml" in registry.archive_sources(spec)


def test_a_generator_of_a_kind_that_does_not_generate_is_refused():
    spec = next(iter(registry.GENERATORS.values()))
    with pytest.raises(ValueError, match="not a kind that generates"):
        registry.GeneratorSpec(**{**spec.__dict__, "kind": "tensor"})


@pytest.mark.parametrize("description", [{"name": "digits"}, {"name": "digits", "size": 28}, {"name": "rgb"},
                                         {"name": "rgb", "resize": 80, "crop": 64}])
def test_the_registry_knows_the_shape_each_image_preset_makes(description):
    from PIL import Image

    from models.preprocessing import build_preset

    made = tuple(build_preset(description)(Image.new("RGB", (50, 40), (90, 20, 200))).shape)
    assert registry.preset_output_shape(description) == made


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_each_entry_has_an_example_request_that_exists(spec):
    assert spec.example is not None
    if spec.example.file:
        assert (ROOT / spec.example.file).is_file()
    assert spec.example.curl_arguments().startswith(f'-H "Content-Type: {spec.example.content_type}" --data-binary ')


def test_an_output_with_its_own_tolerance_is_held_to_it_and_every_other_output_to_the_entrys_atol():
    """An FP16 output beside an FP32 one: at values up to 100 its rounding alone is far past the entry's atol of
    1e-4, so only a bound of its own (rtol) lets it pass, while the FP32 output keeps the strict atol."""
    from export.verify import compare, judge

    values = torch.linspace(1.0, 100.0, 64).reshape(2, 32)
    half = values.half().float()  # one FP16 rounding: up to 4.9e-4 of each value
    strict = registry.Tolerance(atol=1e-4)
    loose = registry.Tolerance(atol=1e-4, outputs={"half": registry.OutputTolerance(atol=1e-6, rtol=1e-3)})

    def report(tol, drift: float = 0.0):
        checks = [compare("logits", values, values + drift, batch=2, inputs="random"),
                  compare("half", values, half, rtol=tol.bound("half").rtol, batch=2, inputs="random")]
        return {"artifact": "model.onnx", "checks": checks, "top1_agreement": None}

    spec = registry.get("pair")
    with_outputs = lambda tol: dataclasses.replace(spec, outputs=("logits", "half"), tolerance=tol,  # noqa: E731
                                                   format_tolerance={})
    failures = judge(with_outputs(strict), "onnx", report(strict))
    assert len(failures) == 1 and "output 'half' max abs diff" in failures[0] and "> atol 0.0001" in failures[0]
    assert judge(with_outputs(loose), "onnx", report(loose)) == []
    drifted = judge(with_outputs(loose), "onnx", report(loose, drift=2e-4))  # the FP32 output is still strict
    assert len(drifted) == 1 and "output 'logits'" in drifted[0]
    beyond = registry.Tolerance(atol=1e-4, outputs={"half": registry.OutputTolerance(rtol=1e-4)})
    too_tight = judge(with_outputs(beyond), "onnx", report(beyond))
    assert len(too_tight) == 1 and "rtol 0.0001 x |reference|" in too_tight[0]


def test_an_output_tolerance_must_name_an_output_of_the_model_and_survives_json():
    spec = registry.get("pair")
    with pytest.raises(ValueError, match="tolerance.outputs names \\['logit'\\]"):
        dataclasses.replace(spec, tolerance=registry.Tolerance(atol=1e-4, outputs={
            "logit": registry.OutputTolerance(rtol=1e-3)}))
    own = dataclasses.replace(spec, tolerance=registry.Tolerance(atol=1e-4, outputs={
        "scores": registry.OutputTolerance(atol=1e-5, rtol=1e-3)}))
    assert registry.ModelSpec.from_json(json.loads(json.dumps(own.to_json()))) == own
