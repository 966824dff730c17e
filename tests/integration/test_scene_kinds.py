"""The scene kinds (handlers/kinds/detect.py, handlers/kinds/segment.py) served by a real TorchServe, over HTTP:
the native forms and OIP, answers in each image's own pixels, batches of images of different sizes, the image
kinds' bad-request matrix, and the held-out split scored through the server against the same score offline
(loadtest/evaluate.py, what `make evaluate` runs). The models are the build tree's (`make test`: quick recipes)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from handlers.kinds.segment import PAD
from loadtest.payloads import payloads
from models import registry
from models.scenes import generate
from tests.conftest import TREE, built, post_together, worker_pids
from tests.kinds import checks, handler_settings, model_store, models_of
from tests.kinds.scene import Reference, mask_of, same_detections, same_masks, shown_size
from tests.ops import bad_inputs

pytestmark = pytest.mark.integration

(DETECTOR, *_), (SEGMENTER, *_) = (models_of(module, registry.REGISTRY.values()) for module in ("detect", "segment"))
SCENE_MODELS = [DETECTOR, SEGMENTER]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One TorchServe serving the scene models (the build tree's exports, packed with the test tiers' handler
    settings: tests/kinds), on free loopback ports; stopped by its PID."""
    from serve_config.control import Ports, start, stop

    work = tmp_path_factory.mktemp("scenes")
    for spec in SCENE_MODELS:
        built(TREE.archive(spec.name))
    store = model_store(SCENE_MODELS, work, TREE)
    try:
        yield start(work / "run", [s.name for s in SCENE_MODELS], ports=Ports.free(), model_store=store)
    finally:
        stop(work / "run")


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format=fmt)
    return buffer.getvalue()


def post(server, model: str, body: bytes, content_type: str = "image/png", route: str = "predictions"):
    url = f"{server.inference_url}/{route}/{model}" if route == "predictions" else \
        f"{server.inference_url}/v2/models/{model}/infer"
    return requests.post(url, data=body, headers={**server.headers(), "Content-Type": content_type}, timeout=120)


def scenes_with_objects(count: int = 6):
    return [s for s in generate("samples", 40, seed=3) if len(s.labels) >= 2][:count]


def test_detections_equal_eager_s_in_each_image_s_own_pixels(server):
    """Samples of many sizes, formats and modes (and photos): the server's detections are eager's, through the same
    letterbox and the way back, inside the image, best first, over the threshold, at most max_detections each."""
    settings, reference = handler_settings(DETECTOR), Reference(DETECTOR)
    counts = []
    for payload in payloads(DETECTOR.name, 12):
        answer = post(server, DETECTOR.name, payload.body, payload.content_type)
        assert answer.status_code == 200, (payload.name, answer.text)
        served = answer.json()
        width, height = shown_size(payload.body)
        assert len(served) <= settings["max_detections"]
        assert [d["score"] for d in served] == sorted((d["score"] for d in served), reverse=True)
        assert all(d["score"] >= settings["score_threshold"] and d["label"] == DETECTOR.labels[d["index"]]
                   and set(d) == {"label", "index", "score", "box"} for d in served)
        assert all(0 <= d["box"][0] <= d["box"][2] <= width and 0 <= d["box"][1] <= d["box"][3] <= height
                   for d in served), (payload.name, width, height)
        same_detections(served, reference.answer(payload.body, payload.content_type), settings["score_threshold"],
                        settings["max_detections"])
        counts.append(len(served))
    assert sum(counts) > 0, "no sample got a detection: nothing was compared"


def test_masks_equal_eager_s_at_each_image_s_own_size_and_fractions_add_up(server):
    reference = Reference(SEGMENTER)
    for payload in payloads(SEGMENTER.name, 8):
        answer = post(server, SEGMENTER.name, payload.body, payload.content_type)
        assert answer.status_code == 200, (payload.name, answer.text)
        served = answer.json()
        width, height = shown_size(payload.body)
        assert (served["width"], served["height"]) == (width, height), payload.name
        mask = mask_of(served)
        assert mask.shape == (height, width) and mask.dtype == np.uint8 and mask.max() < len(SEGMENTER.labels)
        fractions = np.bincount(mask.ravel(), minlength=len(SEGMENTER.labels)) / mask.size
        assert sum(served["classes"].values()) == pytest.approx(1.0, abs=1e-4)
        assert {label: pytest.approx(fractions[SEGMENTER.labels.index(label)], abs=1e-5)
                for label in served["classes"]} == served["classes"]
        same_masks(served, reference.answer(payload.body, payload.content_type))


@pytest.mark.parametrize("spec", SCENE_MODELS, ids=lambda s: s.name)
def test_the_three_native_forms_give_one_answer_and_a_batch_of_sizes_answers_each_alone(server, spec):
    """Raw bytes, a multipart upload and JSON base64 answer alike; requests of different sizes sent at once (one
    batch) answer as each does alone."""
    sample = payloads(spec.name, 1)[0]
    raw = post(server, spec.name, sample.body, sample.content_type)
    multipart = requests.post(f"{server.inference_url}/predictions/{spec.name}", files={"data": sample.body},
                              headers=server.headers(), timeout=120)
    as_json = post(server, spec.name, json.dumps({"image": base64.b64encode(sample.body).decode()}).encode(),
                   "application/json")
    assert raw.status_code == multipart.status_code == as_json.status_code == 200, raw.text
    assert raw.json() == multipart.json() == as_json.json()
    sent = payloads(spec.name, 8)
    alone = [post(server, spec.name, p.body, p.content_type).json() for p in sent]
    together = post_together(server, [(spec.name, p.body, {"Content-Type": p.content_type}) for p in sent])
    assert [a.status_code for a in together] == [200] * len(sent)
    for one, batched in zip(alone, (a.json() for a in together), strict=True):
        checks(spec).same(one, batched)


def test_oip_detections_are_padded_per_answer_and_say_their_count(server):
    rows = [encode(s.image) for s in scenes_with_objects(3)]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [base64.b64encode(r).decode() for r in rows]}]}
    answer = post(server, DETECTOR.name, json.dumps(body).encode(), "application/json", route="infer")
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert [o["name"] for o in answer.json()["outputs"]] == ["boxes", "scores", "labels", "count"]
    count = outputs["count"]["data"]
    k = max(1, *count)
    assert outputs["count"]["datatype"] == "INT32" and outputs["count"]["shape"] == [3]
    assert outputs["boxes"]["shape"] == [3, k, 4] and outputs["boxes"]["datatype"] == "FP32"
    assert outputs["scores"]["shape"] == outputs["labels"]["shape"] == [3, k] and outputs["labels"]["datatype"] == "BYTES"
    boxes = np.asarray(outputs["boxes"]["data"]).reshape(3, k, 4)
    labels, scores = outputs["labels"]["data"], outputs["scores"]["data"]
    settings = handler_settings(DETECTOR)
    for i, row in enumerate(rows):
        assert count[i] <= settings["max_detections"]
        assert labels[i * k + count[i]:(i + 1) * k] == [""] * (k - count[i]) and not boxes[i, count[i]:].any()
        assert not any(scores[i * k + count[i]:(i + 1) * k])
        as_native = [{"label": labels[i * k + j], "score": scores[i * k + j], "box": boxes[i, j].tolist()}
                     for j in range(count[i])]
        same_detections(as_native, post(server, DETECTOR.name, row).json(), settings["score_threshold"],
                        settings["max_detections"])


def test_a_request_sets_its_own_threshold_and_limit_within_the_configs_bounds(server):
    """The detector's knobs per request: native query parameters and OIP `parameters`, each request of one batch
    with its own; past the config's bounds, or not a number, a 400 for that request alone."""
    settings = handler_settings(DETECTOR)
    row = next(r for r in (encode(s.image) for s in scenes_with_objects(6))
               if len(post(server, DETECTOR.name, r).json()) >= 3)
    base = post(server, DETECTOR.name, row).json()
    scores = [d["score"] for d in base]
    gap = max(range(len(scores) - 1), key=lambda i: scores[i] - scores[i + 1])
    cut = (scores[gap] + scores[gap + 1]) / 2  # between two scores, far from both
    header = {"Content-Type": "image/png"}
    jobs = [(DETECTOR.name, row, header), (f"{DETECTOR.name}?max_detections=1", row, header),
            (f"{DETECTOR.name}?score_threshold={cut}", row, header),
            (f"{DETECTOR.name}?score_threshold=0&max_detections={settings['max_detections']}", row, header),
            (f"{DETECTOR.name}?max_detections={settings['max_detections'] + 1}", row, header),
            (f"{DETECTOR.name}?score_threshold=high", row, header), (f"{DETECTOR.name}?max_detections=2.5", row, header)]
    answers = post_together(server, jobs)
    assert [a.status_code for a in answers] == [200] * 4 + [400] * 3, [a.text for a in answers]
    assert answers[0].json() == base and answers[1].json() == base[:1]
    assert answers[2].json() == [d for d in base if d["score"] >= cut] == base[:gap + 1]
    everything = answers[3].json()
    assert len(base) <= len(everything) <= settings["max_detections"] and everything[:len(base)] == base
    assert [a.json()["type"] for a in answers[4:]] == ["InvalidParameter"] * 3
    assert "max_detections" in answers[4].json()["message"] and "score_threshold" in answers[5].json()["message"]

    def infer(parameters):
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(row).decode()]}],
                "parameters": parameters}
        return post(server, DETECTOR.name, json.dumps(body).encode(), "application/json", route="infer")

    answer = infer({"score_threshold": cut, "max_detections": 2})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
    assert outputs["count"] == [min(2, gap + 1)] and min(outputs["scores"][:outputs["count"][0]]) >= cut
    for bad in ({"max_detections": 0}, {"score_threshold": 1.5}, {"score_threshold": "x"}, {"max_detections": True}):
        answer = infer(bad)
        assert answer.status_code == 400 and "error" in answer.json(), (bad, answer.text)


def test_oip_masks_are_padded_with_255_and_carry_each_size(server):
    scene = scenes_with_objects(1)[0]
    pixels = [np.asarray(Image.fromarray(scene.image).resize(size)) for size in ((160, 160), (200, 100))]
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(encode(p)).decode() for p in pixels]}]}
    answer = post(server, SEGMENTER.name, json.dumps(body).encode(), "application/json", route="infer")
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["mask"]["datatype"] == "UINT8" and outputs["mask"]["shape"] == [2, 160, 200]
    assert outputs["size"]["data"] == [160, 160, 100, 200]
    masks = np.asarray(outputs["mask"]["data"], dtype=np.uint8).reshape(2, 160, 200)
    assert (masks[0, :, 160:] == PAD).all() and (masks[1, 100:, :] == PAD).all()
    assert (masks[0, :, :160] < PAD).all() and (masks[1, :100, :] < PAD).all()
    fractions = np.asarray(outputs["fraction"]["data"]).reshape(2, len(SEGMENTER.labels))
    assert fractions.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-4)
    native = post(server, SEGMENTER.name, encode(pixels[1])).json()
    assert (mask_of(native) == masks[1, :100, :]).all()


def test_an_answer_past_the_servers_bound_is_a_413_for_its_request_alone_and_binary_outputs_carry_it(server):
    """Two 1920x1080 photos' masks in OIP's JSON form are about 12 MB, past the 8 MiB a worker may send (TorchServe's
    frontend drops a worker whose answer passes max_response_size, and its batch with it): that request gets a 413
    in OIP's form while its batch neighbours are answered, the workers stay, and binary outputs carry the masks."""
    import tritonclient.http as httpclient

    big = next(p for p in payloads(SEGMENTER.name, 8) if p.name.startswith("000-scene-1920x1080"))
    small = payloads(SEGMENTER.name, 4)[3]  # 128 x 128
    pids = worker_pids(server, SEGMENTER.name)

    def infer(sample, rows: int = 1) -> bytes:
        return json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [rows],
                                       "data": [base64.b64encode(sample.body).decode()] * rows}]}).encode()

    import threading
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("infer", infer(big, 2), "application/json"), ("infer", infer(small), "application/json"),
            ("predictions", big.body, big.content_type)] * 2
    barrier = threading.Barrier(len(jobs))

    def send(job):  # all at once, so that they share batches
        route, body, content_type = job
        barrier.wait(timeout=60)
        return post(server, SEGMENTER.name, body, content_type, route=route)

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    assert [a.status_code for a in answers] == [413, 200, 200] * 2, [a.text[:200] for a in answers]
    assert set(answers[0].json()) == {"error"} and "max_answer_bytes" in answers[0].json()["error"]
    assert worker_pids(server, SEGMENTER.name) == pids, "an answer too large cost a worker"
    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)
    image = httpclient.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(np.array([big.body] * 2, dtype=object), binary_data=True)
    result = client.infer(SEGMENTER.name, [image], headers=dict(server.headers()),
                          outputs=[httpclient.InferRequestedOutput("mask", binary_data=True)])
    assert result.as_numpy("mask").shape == (2, 1080, 1920)
    assert (result.as_numpy("mask")[1] == mask_of(answers[2].json())).mean() >= 0.999


@pytest.mark.parametrize("spec", SCENE_MODELS, ids=lambda s: s.name)
def test_tritonclient_reads_the_binary_answer_as_the_json_one(server, spec):
    """The outputs in the binary tensor extension (what Triton's client asks for unless told otherwise): the same
    tensors as JSON ones, read by the client, for images of two sizes in one request."""
    import tritonclient.http as httpclient

    scene = scenes_with_objects(1)[0]
    rows = np.array([encode(np.asarray(Image.fromarray(scene.image).resize(size))) for size in ((160, 160), (240, 90))],
                    dtype=object)
    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=120)
    headers = dict(server.headers())
    names = [o["name"] for o in client.get_model_metadata(spec.name, headers=headers)["outputs"]]
    answers = {}
    for binary in (True, False):
        image = httpclient.InferInput("image", [2], "BYTES")
        image.set_data_from_numpy(rows, binary_data=True)
        asked = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in names]
        result = client.infer(spec.name, [image], outputs=asked, headers=headers)
        outputs = result.get_response()["outputs"]
        assert [o["name"] for o in outputs] == names
        assert all(("binary_data_size" in o.get("parameters", {})) == binary for o in outputs)
        answers[binary] = {name: result.as_numpy(name) for name in names}
    for name in names:
        got, expected = answers[True][name], answers[False][name]
        if got.dtype == object:
            got = np.vectorize(bytes.decode, otypes=[object])(got)
        assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected), name
    if "mask" in names:
        assert answers[True]["mask"].shape == (2, 160, 240) and (answers[True]["mask"][1, 90:] == PAD).all()


@pytest.mark.parametrize("spec", SCENE_MODELS, ids=lambda s: s.name)
def test_metadata_names_the_outputs_and_their_padding(server, spec):
    metadata = requests.get(f"{server.inference_url}/v2/models/{spec.name}", headers=server.headers(), timeout=30)
    assert metadata.status_code == 200, metadata.text
    body = metadata.json()
    assert body["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    first = body["outputs"][0]
    assert first["name"] in ("boxes", "mask") and "padding" in first["parameters"]


@pytest.mark.parametrize("spec", SCENE_MODELS, ids=lambda s: s.name)
def test_each_bad_image_gets_its_own_4xx_among_good_requests(server, spec):
    """The image kinds' bad-request matrix (tests/ops/bad_inputs.py), all at once among good requests."""
    from serve_config import control as ts

    handler = handler_settings(spec)
    bad = bad_inputs.image_matrix(handler["max_image_bytes"], int(ts.read_properties(ts.TEMPLATE)["max_request_size"]))
    good = [("good", p.body, {"Content-Type": p.content_type}, 200, None) for p in payloads(spec.name, 6)]
    jobs = good + bad
    pids = worker_pids(server, spec.name)
    answers = post_together(server, [(spec.name, body, headers) for _, body, headers, _, _ in jobs])
    wrong = [f"{name}: HTTP {a.status_code}, expected {status}: {a.text[:120]}"
             for (name, _, _, status, _), a in zip(jobs, answers) if a.status_code != status]
    wrong += [f"{name}: type {a.json().get('type')!r}, expected {kind!r}" for (name, _, _, status, kind), a
              in zip(jobs, answers) if kind and a.status_code == status and a.headers.get("content-type", "").startswith(
                  "application/json") and a.json().get("type") != kind]
    assert not wrong, "\n".join(wrong)
    assert worker_pids(server, spec.name) == pids, "a bad request restarted a worker"


@pytest.mark.parametrize("spec", SCENE_MODELS, ids=lambda s: s.name)
def test_the_held_out_score_through_the_server_equals_the_offline_one(server, spec):
    """What `make evaluate` runs, on 100 held-out scenes: the figure from the server's answers within 0.005 of the
    eager checkpoint's with the same post-processing."""
    from loadtest.evaluate import evaluate

    result = evaluate(spec, server.inference_url, server.headers(), checkpoint_dir=TREE.checkpoint(spec.name), count=100,
                      handler=handler_settings(spec))
    headline = result["headline"]
    print(f"\n{spec.name}: {headline} served {result['served'][headline]:.4f}, offline {result['offline'][headline]:.4f}")
    assert result["difference"] <= 0.005, result
    assert result["offline"][headline] > 0.0, "the quick model learned nothing: the comparison would mean nothing"
