"""Export parity: every registered model's artifacts match eager; failures are named and fatal;
and an engineer's own model (a torchvision architecture outside the catalogue) goes the same way."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from export import manifest as mf
from export.export import export
from export.verify import STAMP, ToleranceError, verify
from models import checkpoint, registry
from tests.conftest import CLASSIFIERS, EMBEDDERS, ROOT, TENSORS, TREE, built
from tests.kinds import checks, models_of


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_manifest_describes_each_artifact(spec):
    directory = built(TREE.artifacts(spec.name) / mf.MANIFEST).parent
    manifest = mf.read(directory)
    assert manifest["model"] == spec.name and manifest["commit"] and manifest["preset"] == spec.preset
    assert set(manifest["artifacts"]) == set(spec.formats)
    assert manifest["artifacts"]["onnx"]["opset"] == spec.onnx_opset
    assert manifest["artifacts"]["onnx"]["exporter"] == "torch.onnx.export(dynamo=True)"
    assert manifest["inputs"][0]["dynamic_axes"] == {"0": "batch"}
    mf.check_folder(directory, manifest)


def build_stamp(spec) -> dict:
    """The verification stamp the build wrote (export.verify ran every artifact in a fresh process), held to the
    export it is about: the manifest it names and the files that manifest records. The verifier itself is put
    to the test below, on drifted and tampered exports."""
    directory = built(TREE.artifacts(spec.name) / STAMP).parent
    stamp = json.loads((directory / STAMP).read_text())
    assert stamp["model"] == spec.name and stamp["manifest_sha256"] == mf.sha256(directory / mf.MANIFEST)
    mf.check_folder(directory)
    assert set(stamp["artifacts"]) == set(spec.formats) | set(spec.not_applicable)
    return stamp


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_artifacts_match_eager_within_tolerance(spec):
    """Every format within its own tolerance: fp32 ones elementwise; the INT8 one (static, calibrated on the
    training split) by top-1 agreement and held-out accuracy, at most half a point below eager's."""
    stamp = build_stamp(spec)
    for fmt, result in stamp["artifacts"].items():
        tol = spec.tolerance_for(fmt)
        assert tol.atol is None or result["max_abs_diff"] <= tol.atol, fmt
        assert result["top1_agreement"] >= tol.min_top1_agreement, fmt
        assert result["checks"] == 2 * len(spec.verify_batch_sizes) * len(spec.outputs)
        accuracy = result["accuracy"]
        assert accuracy["eager"] == pytest.approx(json.loads(TREE.checkpoint(spec.name).joinpath("model.json")
                                                             .read_text())["metrics"]["test_accuracy"], abs=1e-3)
        if tol.max_accuracy_drop is not None:
            assert accuracy["eager"] - accuracy["artifact"] <= tol.max_accuracy_drop, fmt
    if "onnx_int8" in spec.formats and spec.quantization == "static":
        manifest = mf.read(TREE.artifacts(spec.name))
        assert manifest["artifacts"]["onnx_int8"]["calibration"]["split"] == "train"
        assert stamp["artifacts"]["onnx_int8"]["max_abs_diff"] > 0  # quantised for real: not the fp32 graph again


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embedder_export_has_dynamic_batch_and_sequence_and_says_what_does_not_apply(spec):
    directory = built(TREE.artifacts(spec.name) / mf.MANIFEST).parent
    manifest = mf.read(directory)
    assert set(manifest["artifacts"]) == set(spec.formats) and manifest["not_applicable"] == spec.not_applicable
    assert all(t["dynamic_axes"] == {"0": "batch", "1": "sequence"} for t in manifest["inputs"])
    assert manifest["artifacts"]["trace"]["checked_shapes"] == [list(s) for s in spec.check_shapes]
    assert set(manifest["assets"]) == set(spec.assets)
    mf.check_folder(directory, manifest)
    import onnx

    graph = onnx.load(str(directory / "model.onnx")).graph
    for tensor in graph.input:  # both axes symbolic in the graph itself, not fixed to the example (2, 16)
        dims = tensor.type.tensor_type.shape.dim
        assert all(d.dim_param and not d.dim_value for d in dims), tensor


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embedder_artifacts_match_sentence_transformers(spec):
    """The build's verification (fresh process per artifact, sentence-transformers' encode() as the reference,
    batches 1/2/7/32, token lengths 3 to 256 and past the limit): every artifact within its tolerance, the
    not-applicable format reported as such, not as a pass."""
    stamp = build_stamp(spec)
    assert stamp["reference"] == spec.reference
    for fmt in spec.formats:
        result, tol = stamp["artifacts"][fmt], spec.tolerance_for(fmt)
        assert result["min_cosine"] >= tol.min_cosine, fmt
        assert tol.atol is None or result["max_abs_diff"] <= tol.atol, fmt
        assert tol.min_mean_cosine is None or result["mean_cosine"] >= tol.min_mean_cosine, fmt
        assert result["checks"] >= sum(-(-40 // b) for b in spec.verify_batch_sizes) - 4, fmt
    assert stamp["artifacts"]["trace"]["min_cosine"] >= 0.9999 and stamp["artifacts"]["onnx"]["max_abs_diff"] <= 1e-4
    assert stamp["artifacts"]["script"] == {"not_applicable": spec.not_applicable["script"]}


@pytest.mark.parametrize("spec", TENSORS, ids=lambda s: s.name)
def test_tensor_model_manifest_says_what_goes_in_and_out_and_every_artifact_matches_eager(spec):
    """A tensor-kind model: the manifest names the kind, each input (dtype, shape, dynamic axes) and each output
    with its dtype and shape (-1 on the axes that follow the batch); verification covered every batch size and
    the held-out split's top-1 where the entry has one."""
    directory = built(TREE.artifacts(spec.name) / mf.MANIFEST).parent
    manifest = mf.read(directory)
    assert manifest["kind"] == "tensor" and [i["name"] for i in manifest["inputs"]] == [t.name for t in spec.inputs]
    assert [o["name"] for o in manifest["output_specs"]] == list(spec.outputs)
    assert all(o["shape"][0] == -1 for o in manifest["output_specs"])
    stamp = build_stamp(spec)
    for fmt, result in stamp["artifacts"].items():
        assert result["max_abs_diff"] <= spec.tolerance.atol, fmt
        assert result["checks"] == (2 if spec.dataset else 1) * len(spec.verify_batch_sizes) * len(spec.outputs) + \
            len(spec.check_shapes) * len(spec.outputs), fmt
        if spec.dataset:
            assert result["top1_agreement"] >= spec.tolerance.min_top1_agreement, fmt


def test_a_multi_input_multi_output_model_with_a_dynamic_length_exports_and_verifies_over_its_grid(tmp_path):
    """Two inputs of different dtypes (FP32 features, INT64 tokens of any length), two outputs (FP32 and INT64):
    every format verified over batch sizes x lengths; the manifest's outputs say -1 for the batch axis only."""
    spec = registry.get("pair")
    torch.manual_seed(0)
    model = checkpoint.build_model(spec.builder, spec.builder_kwargs).eval()
    checkpoint.save(model, spec, tmp_path / "checkpoint", metrics={})
    manifest = export(spec, tmp_path / "checkpoint", tmp_path / "artifacts")
    assert manifest["output_specs"] == [{"name": "scores", "dtype": "float32", "shape": [-1, 3]},
                                        {"name": "strongest", "dtype": "int64", "shape": [-1]}]
    stamp = verify(spec, tmp_path / "checkpoint", tmp_path / "artifacts")
    for fmt in ("trace", "script", "onnx"):
        result = stamp["artifacts"][fmt]
        assert result["max_abs_diff"] <= 1e-4 and result["checks"] == 2 * (len(spec.verify_batch_sizes) + 3), fmt
    import onnx

    graph = onnx.load(str(tmp_path / "artifacts" / "model.onnx")).graph
    tokens = next(i for i in graph.input if i.name == "tokens").type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in tokens), "batch and length symbolic in the graph"


def test_a_drifted_embedder_fails_verification_by_name(tmp_path):
    spec = registry.get("minilm")
    model, meta = checkpoint.load(built(TREE.checkpoint("minilm")))
    with torch.no_grad():
        model.bert.encoder.layer[-1].output.LayerNorm.bias += 0.05  # a small drift in the last layer
    checkpoint.save(model, spec, tmp_path / "drifted", metrics={}, builder_kwargs=meta["builder_kwargs"])
    shutil.copy2(TREE.checkpoint("minilm") / "tokenizer.json", tmp_path / "drifted")
    drifted = dataclasses.replace(spec, formats=("onnx",), format_tolerance={})
    export(drifted, tmp_path / "drifted", tmp_path / "artifacts")
    with pytest.raises(ToleranceError) as info:
        verify(drifted, tmp_path / "drifted", tmp_path / "artifacts")
    assert "model.onnx (onnx) output 'sentence_embedding' max abs diff" in str(info.value)


@pytest.fixture(scope="module")
def digits_copy(tmp_path_factory):
    """A private copy of the digits checkpoint and artifacts that tests may damage."""
    root = tmp_path_factory.mktemp("digits")
    shutil.copytree(built(TREE.checkpoint("digits")), root / "checkpoint")
    shutil.copytree(built(TREE.artifacts("digits")), root / "artifacts")
    return root


def test_tampered_artifact_is_refused(digits_copy):
    target = digits_copy / "artifacts" / "model.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(mf.IntegrityError, match="model.onnx"):
        verify(registry.get("digits"), digits_copy / "checkpoint", digits_copy / "artifacts")


def test_a_drifted_export_fails_with_a_named_difference(tmp_path):
    """Artifacts that no longer do what their checkpoint does fail, each by name. The drift is put in the checkpoint
    after export (verify sees the same pair as an export that drifted from its checkpoint, without a second export)."""
    spec = dataclasses.replace(registry.get("digits"), format_tolerance={})
    shutil.copytree(built(TREE.artifacts("digits")), tmp_path / "artifacts")
    model, _ = checkpoint.load(built(TREE.checkpoint("digits")))
    with torch.no_grad():
        model.classifier[-1].bias += 0.01  # a small, systematic drift on every logit
    checkpoint.save(model, spec, tmp_path / "drifted", metrics={})
    with pytest.raises(ToleranceError) as info:
        verify(spec, tmp_path / "drifted", tmp_path / "artifacts")
    message = str(info.value)
    for fmt in spec.formats:
        assert mf.ARTIFACT_FILES[fmt] in message, fmt
    assert "output 'logits' max abs diff" in message and "> atol 0.0001 at batch 1" in message


BRING_YOUR_OWN = registry.ModelSpec(
    name="mobilenet-own",
    builder="torchvision.models:mobilenet_v3_small",
    builder_kwargs={"num_classes": 5, "weights": None},
    preset={"name": "rgb", "resize": 64, "crop": 64},  # makes the model's 3x64x64 input
    inputs=(registry.TensorSpec(name="image", dtype="float32", example_shape=(2, 3, 64, 64)),),
    outputs=("logits",),
    labels=("a", "b", "c", "d", "e"),
    tolerance=registry.Tolerance(atol=1e-4),
    serve_by_default=False,
)


def test_a_preset_that_does_not_make_the_models_input_is_refused_by_the_registry():
    with pytest.raises(ValueError, match=r"makes \(1, 32, 32\) tensors.*'rgb', 'resize': 64, 'crop': 64"):
        dataclasses.replace(BRING_YOUR_OWN, preset={"name": "digits"})


@pytest.mark.integration
def test_an_engineers_own_torchvision_model_exports_verifies_archives_and_serves(tmp_path):
    """The README's bring-your-own path end to end: checkpoint, export, verify, archive, then a real
    TorchServe serving it answers a real photo with a prediction over the model's own labels."""
    import requests

    from export import archive
    from serve_config import control

    torch.manual_seed(0)
    model = checkpoint.build_model(BRING_YOUR_OWN.builder, BRING_YOUR_OWN.builder_kwargs).eval()
    checkpoint.save(model, BRING_YOUR_OWN, tmp_path / "checkpoint", metrics={})
    manifest = export(BRING_YOUR_OWN, tmp_path / "checkpoint", tmp_path / "artifacts")
    assert set(manifest["artifacts"]) == set(registry.DEFAULT_FORMATS)  # torch.export and AOTInductor included
    stamp = verify(BRING_YOUR_OWN, tmp_path / "checkpoint", tmp_path / "artifacts")
    assert all(r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] is None for r in stamp["artifacts"].values())
    assert json.loads((tmp_path / "artifacts" / "verified.json").read_text())["model"] == "mobilenet-own"

    config = tmp_path / "mobilenet-own.yaml"
    config.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 5\nresponseTimeout: 60\n"
                      "handler:\n  topk: 3\n")
    archive.archive(BRING_YOUR_OWN, tmp_path / "artifacts", tmp_path / "store", config=config,
                    staging=tmp_path / "staging")
    run_dir = tmp_path / "run"
    server = control.start(run_dir, ["mobilenet-own"], ports=control.Ports.free(), model_store=tmp_path / "store")
    try:
        photo = ROOT / registry.get("shapes").example.file
        answer = requests.post(f"{server.inference_url}/predictions/mobilenet-own", data=photo.read_bytes(),
                               headers={**server.headers(), "Content-Type": "image/jpeg"}, timeout=60)
    finally:
        control.stop(run_dir)
    assert answer.status_code == 200, answer.text
    top = answer.json()
    assert len(top) == 3 and all(p["label"] in BRING_YOUR_OWN.labels for p in top)
    assert top[0]["score"] >= top[1]["score"] >= top[2]["score"] and 0 < sum(p["score"] for p in top) <= 1.0001


@pytest.mark.parametrize("spec", [s for module in ("detect", "segment") for s in models_of(module, registry.REGISTRY.values())],
                         ids=lambda s: s.name)
def test_scene_exports_were_verified_by_their_kind_s_own_figures(spec):
    """The detector's and the segmenter's exports, compared by their kind (handlers/kinds: matched detections, pixel
    agreement) at every verified batch size and every image size, within the registry's tolerance."""
    stamp = build_stamp(spec)
    for fmt in spec.formats:
        result, tol = stamp["artifacts"][fmt], spec.tolerance_for(fmt)
        assert result["checks"] == len(spec.verify_batch_sizes) + len(spec.verify_image_sizes)
        checks(spec).assert_verified(result["figures"], tol)
    for fmt, reason in spec.not_applicable.items():
        assert stamp["artifacts"][fmt] == {"not_applicable": reason}
