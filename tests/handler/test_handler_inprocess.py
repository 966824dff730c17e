"""The real .mar's handler, run in-process with TorchServe's own Context and RequestProcessor objects."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import pytest
import ts
import yaml
from ts.context import Context, RequestProcessor

from loadtest.payloads import payloads
from models import registry
from tests.conftest import CLASSIFIERS, EMBEDDERS, TENSORS, TREE, ClassifierReference, built
from tests.kinds import checks, handler_settings, models_of, scene


def load_handler(spec, tmp_path, **handler_settings):
    """Unpack the built archive and instantiate its handler as TorchServe's model loader would (with
    `handler_settings` changed in the archive's model-config YAML)."""
    model_dir = tmp_path / spec.name
    with zipfile.ZipFile(built(TREE.archive(spec.name))) as mar:
        mar.extractall(model_dir)
    if handler_settings:
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config_file = model_dir / manifest["model"]["configFile"]
        config = yaml.safe_load(config_file.read_text())
        config["handler"] = {**config.get("handler", {}), **handler_settings}
        config_file.write_text(yaml.safe_dump(config))
    return initialize(spec.name, model_dir)


def initialize(name, model_dir):
    """The handler of an unpacked archive, initialized with TorchServe's own Context as its model loader does."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    module_spec = importlib.util.spec_from_file_location(f"mar_{name}_handler", model_dir / manifest["model"]["handler"])
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    handler_class = next(v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__)
    context = Context(name, str(model_dir), manifest, config["batchSize"], None, ts.__version__,
                      model_yaml_config=config)
    handler = handler_class()
    handler.initialize(context)
    return handler, context


def call(handler, context, requests, headers):
    context.request_processor = [RequestProcessor(h) for h in headers]
    return handler.handle(requests, context)


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_mixed_batch_gets_one_answer_each_matching_eager(spec, tmp_path):
    handler, context = load_handler(spec, tmp_path)
    samples = payloads(spec.name, 14)
    bad = [({"body": b"not an image"}, {"body": {"content-type": "image/png"}}, 400, "InvalidImage"),
           ({"body": b""}, {"body": {"content-type": "image/png"}}, 400, "EmptyRequest"),
           ({"body": {"img": "x"}}, {"body": {"content-type": "application/json"}}, 400, "InvalidJSON"),
           ({"body": b"\x89PNG"}, {"Content-Type": "application/x-www-form-urlencoded"}, 415, "UnsupportedMediaType")]
    requests = [{"body": s.body} for s in samples]
    headers = [{"body": {"content-type": s.content_type}} for s in samples]
    for position, (req, hdr, _, _) in zip((0, 5, 9, 16), bad):
        requests.insert(position, req)
        headers.insert(position, hdr)
    answers = call(handler, context, requests, headers)
    assert len(answers) == len(requests) == 18

    reference = ClassifierReference(spec.name)
    good = iter(samples)
    for idx, answer in enumerate(answers):
        status, _phrase = context.get_response_status(idx)
        assert context.get_response_content_type(idx) == "application/json"
        body = json.loads(answer)
        expected_bad = [b for p, b in zip((0, 5, 9, 16), bad) if p == idx]
        if expected_bad:
            assert (status, body["code"], body["type"]) == (expected_bad[0][2], expected_bad[0][2], expected_bad[0][3])
            continue
        sample = next(good)
        assert status == 200 and len(body) == 5
        reference.assert_matches(body, sample.body)


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_real_samples_are_classified_correctly(spec, tmp_path):
    handler, context = load_handler(spec, tmp_path)
    samples = payloads(spec.name, 70)
    answers = call(handler, context, [{"body": s.body} for s in samples],
                   [{"body": {"content-type": s.content_type}} for s in samples])
    labelled = [(a, s) for a, s in zip(answers, samples) if s.label >= 0]  # photos of no class carry -1
    correct = sum(json.loads(a)[0]["index"] == s.label for a, s in labelled)
    # the served model on real payloads (any size, mode, format) does about as well as on its test split
    test_accuracy = json.loads(built(TREE.checkpoint(spec.name) / "model.json").read_text())["metrics"]["test_accuracy"]
    assert correct / len(labelled) >= test_accuracy - 0.1, f"{correct}/{len(labelled)} correct; test split {test_accuracy}"


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
def test_embedder_batch_answers_each_request_in_order_and_matches_the_reference(spec, tmp_path, sentence_reference):
    handler, context = load_handler(spec, tmp_path)
    samples = payloads(spec.name, 12)
    texts = [json.loads(s.body)["text"] if s.content_type == "application/json" else s.body.decode() for s in samples]
    listed = ["short one", "word " * 400, "a middle-sized sentence about serving embeddings"]
    requests = [{"body": s.body} for s in samples] + [{"body": {"texts": listed}}]
    headers = [{"body": {"content-type": s.content_type}} for s in samples] + [{"body": {"content-type": "application/json"}}]
    bad = [({"body": b"\xc3\x28"}, "text/plain", 400, "InvalidUTF8"),
           ({"body": {"texts": ["ok", 7]}}, "application/json", 400, "InvalidText"),
           ({"body": b"{oops"}, "application/json", 400, "InvalidJSON"),
           ({"body": {"texts": ["x"] * 65}}, "application/json", 413, "TooManyTexts")]
    for position, (req, ctype, _, _) in zip((0, 4, 8, 15), bad):
        requests.insert(position, req)
        headers.insert(position, {"body": {"content-type": ctype}})
    answers = call(handler, context, requests, headers)
    assert len(answers) == len(requests) == 17

    good = iter(texts)
    embeddings, expected_texts = [], []
    for idx, answer in enumerate(answers):
        status, _ = context.get_response_status(idx)
        body = json.loads(answer)
        expected_bad = [b for p, b in zip((0, 4, 8, 15), bad) if p == idx]
        if expected_bad:
            assert (status, body["code"], body["type"]) == (expected_bad[0][2], expected_bad[0][2], expected_bad[0][3])
        elif "embeddings" in body:
            assert status == 200 and [e["truncated"] for e in body["embeddings"]] == [False, True, False]
            assert body["embeddings"][1]["tokens"] == 256
            embeddings += [e["embedding"] for e in body["embeddings"]]
            expected_texts += listed
        else:
            assert status == 200 and len(body["embedding"]) == 384 and 3 <= body["tokens"] <= 256
            embeddings.append(body["embedding"])
            expected_texts.append(next(good))
    assert len(expected_texts) == len(texts) + len(listed)
    sentence_reference.assert_matches(embeddings, expected_texts)


@pytest.mark.parametrize("spec", TENSORS, ids=lambda s: s.name)
def test_tensor_batch_of_infer_requests_and_bad_ones_each_get_their_own_answer(spec, tmp_path):
    """Real held-out rows as infer requests (JSON, some parsed by the frontend, some raw bytes), with bad requests
    among them: each good answer equals the eager checkpoint on its rows, each bad one its own OIP 4xx."""
    handler, context = load_handler(spec, tmp_path)
    samples = payloads(spec.name, 12)
    requests = [{"body": json.loads(s.body) if i % 2 else s.body} for i, s in enumerate(samples)]
    headers = [{"body": {"content-type": "application/json"}} for _ in samples]
    bad = [({"body": {"inputs": []}}, 400), ({"body": b"{oops"}, 400), ({"body": b"\x89PNG"}, 415),
           ({"body": {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}, 400)]
    for position, (req, _) in zip((0, 4, 8, 15), bad):
        requests.insert(position, req)
        headers.insert(position, {"body": {"content-type": "image/png" if req["body"] == b"\x89PNG" else "application/json"}})
    answers = call(handler, context, requests, headers)
    assert len(answers) == len(requests) == 16
    good = []
    for idx, answer in enumerate(answers):
        status, _ = context.get_response_status(idx)
        expected_bad = [b for p, b in zip((0, 4, 8, 15), bad) if p == idx]
        if expected_bad:
            assert status == expected_bad[0][1] and list(json.loads(answer)) == ["error"], answer
        else:
            assert status == 200, answer
            good.append(json.loads(answer))
    checks(spec).assert_native(samples, good)


SCENES = models_of("detect", registry.REGISTRY.values()) + models_of("segment", registry.REGISTRY.values())


@pytest.mark.parametrize("spec", SCENES, ids=lambda s: s.name)
def test_scene_batch_of_many_sizes_and_bad_requests_each_get_their_own_answer(spec, tmp_path):
    """One batch of samples of many sizes (one forward pass, letterboxed) with bad requests among them: each bad one
    its own 4xx, each good one what the kind's pipeline on the eager checkpoint answers, in its own image's pixels.
    The archive's config is given the test tiers' handler settings (tests/kinds) before it loads."""
    model_dir = tmp_path / spec.name
    with zipfile.ZipFile(built(TREE.archive(spec.name))) as mar:
        mar.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config_file = model_dir / manifest["model"]["configFile"]
    config = yaml.safe_load(config_file.read_text())
    config_file.write_text(yaml.safe_dump({**config, "handler": handler_settings(spec)}))
    handler, context = initialize(spec.name, model_dir)
    samples = payloads(spec.name, 8)
    bad = [({"body": b"not an image"}, {"body": {"content-type": "image/png"}}, 400, "InvalidImage"),
           ({"body": b""}, {"body": {"content-type": "image/png"}}, 400, "EmptyRequest"),
           ({"body": {"img": "x"}}, {"body": {"content-type": "application/json"}}, 400, "InvalidJSON")]
    requests = [{"body": s.body} for s in samples]
    headers = [{"body": {"content-type": s.content_type}} for s in samples]
    for position, (req, hdr, _, _) in zip((0, 4, 9), bad):
        requests.insert(position, req)
        headers.insert(position, hdr)
    answers = call(handler, context, requests, headers)
    assert len(answers) == len(requests)
    reference = scene.Reference(spec)
    errors = {position: (status, kind) for position, (_, _, status, kind) in zip((0, 4, 9), bad)}
    good = iter(samples)
    for position, answer in enumerate(answers):
        if position in errors:
            assert json.loads(answer)["type"] == errors[position][1]
            assert context.get_response_status(position)[0] == errors[position][0]
            continue
        sample = next(good)
        checks(spec).same(json.loads(answer), reference.answer(sample.body, sample.content_type))


@pytest.mark.parametrize("spec", [group[0] for group in (CLASSIFIERS, EMBEDDERS, TENSORS) if group],
                         ids=lambda s: s.name)
def test_response_cache_answers_a_repeat_uncomputed_with_the_computed_answer(spec, tmp_path):
    """With response_cache_mb set, a repeated request is answered from the worker's cache (X-Cache: HIT) with the
    bytes it was first answered with, and never reaches the model; Cache-Control no-cache computes it again, no-store
    keeps nothing; a refused request is never kept; another version of the model shares no entry."""
    handler, context = load_handler(spec, tmp_path, response_cache_mb=1)
    computed = []
    run = handler.pipeline.run
    handler.pipeline.run = lambda batch: computed.append(batch) or run(batch)
    samples = payloads(spec.name, 3)
    request = [{"body": s.body} for s in samples]
    header = [{"body": {"content-type": s.content_type}} for s in samples]

    def status(idx):
        return context.get_response_status(idx)[0], context.get_response_headers(idx).get("X-Cache")

    first = []
    for one, its_header in zip(request, header):  # each alone: a batch's padding may move an embedding's last digit
        first += call(handler, context, [one], [its_header])
        assert status(0) == (200, "MISS")
    assert len(computed) == 3
    again = call(handler, context, request[::-1], header[::-1])
    assert again == first[::-1] and [status(i) for i in range(3)] == [(200, "HIT")] * 3
    assert len(computed) == 3, "a cached answer was computed again"

    for directive, label in (("no-cache", "BYPASS"), ("no-store", "BYPASS"), ("max-age=0, No-Cache", "BYPASS")):
        answer = call(handler, context, request[:1], [{**header[0], "Cache-Control": directive}])
        assert answer == first[:1] and status(0) == (200, label)
    assert len(computed) == 6
    assert call(handler, context, request[:1], header[:1]) == first[:1] and status(0) == (200, "HIT")

    fresh = payloads(spec.name, 4)[3]
    call(handler, context, [{"body": fresh.body}], [{"body": {"content-type": fresh.content_type}, "Cache-Control": "no-store"}])
    call(handler, context, [{"body": fresh.body}], [{"body": {"content-type": fresh.content_type}}])
    assert status(0) == (200, "MISS"), "a no-store answer was kept"

    bad = [{"body": b"\xff not what the model reads"}]
    bad_header = [{"body": {"content-type": samples[0].content_type}}]
    for _ in range(2):
        (refused,) = call(handler, context, bad, bad_header)
        assert 400 <= context.get_response_status(0)[0] < 500 and status(0)[1] == "MISS", refused

    context.manifest["model"]["modelVersion"] = "2.0"  # what the next version's worker would be served as
    assert call(handler, context, request[:1], header[:1]) == first[:1] and status(0) == (200, "MISS")
    assert len(handler.cache) > 0 and handler.cache.bytes <= handler.cache.max_bytes
