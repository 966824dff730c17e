"""The image pipeline (handlers.images, and the classifier of handlers.kinds.classify) and the shared request helpers (handlers.requests), against a tiny fixed-weight model (exact outputs)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from torch import nn

from handlers.images import extract_image_bytes
from handlers.kinds.classify import ClassifierConfig, ImageClassifier, topk_predictions
from handlers.requests import (MAX_QUERY_FIELDS, QUERY_HEADER, RequestError, content_type_of, expired,
                               with_query)
from models.preprocessing import DigitsPreset
from models.runtime import ModuleRunner
from models.samples import encode, render
from tests.ops.bad_inputs import png

PNG = encode(render(torch.eye(8).numpy(), polarity="dark-on-light"))
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize("request_, ctype", [
    ({"body": PNG}, "image/png"),
    ({"body": PNG}, ""),
    ({"body": {"image": B64}}, "application/json"),
    ({"body": {"image": "data:image/png;base64," + B64}}, "application/json"),
    ({"body": json.dumps({"image": B64}).encode()}, "application/json"),  # TorchServe left JSON undecoded
    ({"data": PNG}, "multipart/form-data"),
    ({"file": bytearray(PNG), "note": "hello"}, "multipart/form-data"),
    ({"upload": PNG}, "multipart/form-data"),
])
def test_every_request_form_yields_the_image_bytes(request_, ctype):
    assert extract_image_bytes(request_, ctype, max_bytes=10**6) == PNG


@pytest.mark.parametrize("request_, ctype, status, kind", [
    ({}, "", 400, "EmptyRequest"),
    ({"body": b""}, "image/png", 400, "EmptyRequest"),
    ({"body": b"{not json"}, "application/json", 400, "InvalidJSON"),
    ({"body": b"\xff\xfe"}, "application/json", 400, "InvalidJSON"),
    ({"body": [1, 2]}, "application/json", 400, "InvalidJSON"),
    ({"body": {"img": B64}}, "application/json", 400, "InvalidJSON"),
    ({"body": {"image": 42}}, "application/json", 400, "InvalidJSON"),
    ({"body": {"image": "***not base64***"}}, "application/json", 400, "InvalidBase64"),
    ({"body": "just some text"}, "text/plain", 400, "UnsupportedInput"),
    ({"note": "no file here"}, "multipart/form-data", 400, "UnsupportedInput"),
    ({"body": PNG}, "application/x-www-form-urlencoded", 415, "UnsupportedMediaType"),
    ({"body": b"x" * 101}, "image/png", 413, "PayloadTooLarge"),
])
def test_bad_requests_get_their_own_status(request_, ctype, status, kind):
    with pytest.raises(RequestError) as info:
        extract_image_bytes(request_, ctype, max_bytes=100)
    body = json.loads(info.value.body())
    assert (info.value.status, info.value.kind) == (status, kind)
    assert body == {"code": status, "type": kind, "message": info.value.message} and body["message"]


def test_content_type_is_read_case_insensitively_without_parameters():
    assert content_type_of({"Content-Type": "Application/JSON; charset=utf-8"}) == "application/json"
    assert content_type_of({}) == "" and content_type_of(None) == ""


def test_a_predictions_query_becomes_request_fields_that_never_replace_its_body():
    plain, multipart = {"body": PNG}, {"data": PNG, "threshold": b"form"}
    many = "&".join(f"k{i}=v" for i in range(MAX_QUERY_FIELDS + 5))
    tagged = with_query([plain, multipart, plain, plain, None],
                        [{"X-Query-Parameters": "score_threshold=0.5&max_detections=3&max_detections=9&body=x"},
                         {QUERY_HEADER: "threshold=query&data=y&extra=%20z"}, {}, {QUERY_HEADER: many},
                         {QUERY_HEADER: "a=1"}])
    assert tagged[0] == {"body": PNG, "score_threshold": "0.5", "max_detections": "3"}
    assert tagged[1] == {"data": PNG, "threshold": b"form", "extra": " z"}
    assert tagged[2] is plain and len(tagged[3]) == MAX_QUERY_FIELDS + 1 and tagged[4] == {"a": "1"}
    assert extract_image_bytes(tagged[0], "image/png", max_bytes=1 << 20) == PNG


def test_a_deadline_counts_from_the_frontends_arrival_time():
    assert expired({}, 10_000) is None and expired({"x-received-ms": "1000"}, 10_000) is None  # no deadline
    assert expired({"X-Request-Timeout-Ms": "500", "x-received-ms": "1000"}, 1_400) is None
    late = expired({"X-Request-Timeout-Ms": "500", "x-received-ms": "1000"}, 1_600)
    assert late.status == 504 and late.kind == "DeadlineExceeded" and "600 ms" in late.message
    assert expired({"X-Request-Timeout-Ms": "500"}, 1e12) is None  # no arrival time: nothing to judge by
    # within its deadline, but a batch takes longer than it has left: refused now rather than answered late
    deadline = {"X-Request-Timeout-Ms": "500", "x-received-ms": "1000"}
    assert expired(deadline, 1_400, service_ms=50.0) is None
    doomed = expired(deadline, 1_400, service_ms=150.0)
    assert doomed.status == 504 and "400 ms" in doomed.message and "150 ms more" in doomed.message
    for bad in ("0", "-5", "1.5", "soon", "", str(24 * 3600 * 1000 + 1)):
        error = expired({"x-request-timeout-ms": bad, "x-received-ms": "1000"}, 1_000)
        assert error.status == 400 and error.kind == "InvalidTimeout", bad


def test_an_oip_requests_timeout_parameter_is_a_deadline_in_microseconds():
    arrived = {"x-received-ms": "1000"}
    infer = {"body": {"inputs": [], "parameters": {"timeout": 500_000}}}  # 500 ms, as Triton's clients send it
    assert expired(arrived, 1_400, infer) is None
    late = expired(arrived, 1_600, infer)
    assert late.status == 504 and late.oip and json.loads(late.body()) == {"error": late.message}
    assert expired({**arrived, "x-request-timeout-ms": "5000"}, 1_600, infer) is None  # the header comes first
    assert expired(arrived, 1e12, {"body": {"inputs": []}}) is None and expired(arrived, 1e12, {"body": b"x"}) is None
    untyped = {"body": json.dumps({"inputs": [], "parameters": {"timeout": 500_000}}).encode()}  # Triton's client
    assert expired(arrived, 1_400, untyped) is None and expired(arrived, 1_600, untyped).status == 504
    assert expired(arrived, 1e12, {"body": b'{"inputs": [], "id": "no deadline"}'}) is None
    header = json.dumps({"inputs": [], "parameters": {"timeout": 1000}}).encode()
    binary = {"body": header + b"\0" * 16}
    assert expired(arrived, 1_002, binary, len(header)).status == 504 and expired(arrived, 1_002, binary) is None
    for bad in (0, -1, 1.5, "500", True, 24 * 3600 * 10**6 + 1):
        error = expired(arrived, 1_000, {"body": {"inputs": [], "parameters": {"timeout": bad}}})
        assert error.status == 400 and error.kind == "InvalidTimeout" and error.oip, bad


def test_topk_is_best_first_and_clipped_to_the_class_count():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], dtype=np.float32)
    top = topk_predictions(probs, ["a", "b", "c"], k=5)
    assert [p["label"] for p in top[0]] == ["b", "c", "a"] and [p["index"] for p in top[1]] == [0, 2, 1]
    assert top[0][0]["score"] == pytest.approx(0.6)


def test_config_is_checked_when_built():
    assert ClassifierConfig.from_mapping({"topk": 3}).topk == 3
    with pytest.raises(ValueError, match="unknown handler settings"):
        ClassifierConfig.from_mapping({"top_k": 3})
    with pytest.raises(ValueError, match="positive integer"):
        ClassifierConfig(max_image_bytes=0)


class Brightness(nn.Module):
    """Fixed weights: logit 1 is the mean pixel, logit 0 its negative (exact, checkable outputs)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = image.mean(dim=(1, 2, 3))
        return torch.stack([-mean, mean], dim=1) * 10


@pytest.fixture
def classifier() -> ImageClassifier:
    model = Brightness().eval()
    return ImageClassifier(ModuleRunner(model), DigitsPreset(), ["dark", "bright"],
                           ClassifierConfig(topk=2, max_image_bytes=10_000, max_image_pixels=10_000))


def test_a_batch_gets_one_answer_per_request_and_bad_ones_do_not_spill(classifier):
    big = encode(render(torch.ones(200, 200).numpy()))  # 1600x1600 pixels > max_image_pixels
    requests = [{"body": PNG}, {"body": b"garbage"}, {"body": {"image": B64}}, {"body": big}, {}]
    ctypes = ["image/png", "image/png", "application/json", "image/png", ""]
    results = classifier.process(requests, ctypes)
    assert len(results) == 5
    good = [json.loads(results[i]) for i in (0, 2)]
    assert good[0] == good[1] and [p["label"] for p in good[0]] == ["dark", "bright"]
    assert [(r.status, r.kind) for r in (results[1], results[3], results[4])] == [
        (400, "InvalidImage"), (413, "ImageTooLarge"), (400, "EmptyRequest")]


def test_the_batch_is_one_forward_pass(classifier):
    calls = []
    inner = classifier.runner
    classifier.runner = lambda inputs: calls.append(inputs[0].shape[0]) or inner(inputs)
    classifier.process([{"body": PNG}] * 5 + [{"body": b""}], ["image/png"] * 6)
    assert calls == [5]


def test_an_unexpected_decoder_error_costs_only_its_request(classifier):
    original = classifier.preset

    def preset_with_a_bug(image):
        if image.width == 65:
            raise RuntimeError("a bug in the decoder")
        return original(image)

    classifier.preset = preset_with_a_bug
    odd = encode(render(torch.zeros(8, 8).numpy(), scale=8).resize((65, 65)))
    results = classifier.process([{"body": PNG}, {"body": odd}], ["image/png", "image/png"])
    assert isinstance(results[0], str) and (results[1].status, results[1].kind) == (500, "InternalError")


def test_decoding_on_several_threads_gives_the_same_answers_in_order(classifier):
    from dataclasses import replace

    threaded = ImageClassifier(classifier.runner, classifier.preset, classifier.labels,
                               replace(classifier.config, preprocess_threads=3))
    dark, light = encode(render(torch.zeros(8, 8).numpy())), encode(render(torch.ones(8, 8).numpy()))
    requests = [{"body": dark}, {"body": b"garbage"}, {"body": light}, {"body": {"image": B64}}, {"body": dark}] * 3
    ctypes = ["image/png", "image/png", "image/png", "application/json", "image/png"] * 3
    serial, parallel = classifier.process(requests, ctypes), threaded.process(requests, ctypes)
    assert [r if isinstance(r, str) else (r.status, r.kind) for r in serial] == \
           [r if isinstance(r, str) else (r.status, r.kind) for r in parallel]
    assert threaded._pool is not None and classifier._pool is None


def oip_images(*images: bytes) -> dict:
    return {"body": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                 "data": [base64.b64encode(i).decode() for i in images]}]}}


def budgeted(classifier: ImageClassifier, **limits) -> ImageClassifier:
    from dataclasses import replace

    config = replace(classifier.config, max_image_bytes=1_000_000, max_image_pixels=1_000_000, **limits)
    return ImageClassifier(classifier.runner, classifier.preset, classifier.labels, config)


def test_a_request_whose_images_decode_past_its_pixel_budget_is_refused_before_decoding_them(classifier):
    """Bytes say little of pixels: a few hundred bytes of PNG decode to a million. A request's images share
    max_pixels_per_request; the image that would pass it is refused before it is decoded, the rest of the
    request with it, and its neighbours are answered."""
    limited = budgeted(classifier, max_pixels_per_request=2_500_000, max_pixels_per_batch=100_000_000)
    decoded = []
    preset = limited.preset
    limited.preset = lambda image: decoded.append(image.size) or preset(image)
    big = png(1000, 1000, 200, mode="L")
    results = limited.process([{"body": PNG}, oip_images(*[big] * 64), {"body": big}], ["image/png", "application/json", "image/png"])
    assert isinstance(results[0], str) and isinstance(results[2], str)
    assert (results[1].status, results[1].kind) == (413, "RequestTooLarge")
    assert "max_pixels_per_request" in results[1].body() and results[1].oip
    assert decoded.count((1000, 1000)) == 2 + 1  # two of the 64 rows, then the third request


def test_a_batch_decodes_within_its_pixel_budget_and_the_rest_are_told_to_retry(classifier):
    limited = budgeted(classifier, max_pixels_per_request=1_000_000, max_pixels_per_batch=2_500_000)
    big, pixels = png(1000, 1000, 200, mode="L"), {"body": PNG}
    results = limited.process([{"body": big}, pixels, {"body": big}, {"body": big}, pixels], ["image/png"] * 5)
    answered = [isinstance(r, str) for r in results]
    assert answered == [True, True, True, False, True]
    assert (results[3].status, results[3].kind) == (503, "BatchBudgetSpent")
    # UINT8 pixels count as well
    rows = {"body": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 1000, 1000, 1],
                                 "data": [200] * 3_000_000}]}}
    refused = limited.process([rows], ["application/json"])[0]
    assert (refused.status, refused.kind) == (413, "RequestTooLarge")
