"""The Open Inference Protocol in the pipelines (handlers.oip, handlers.images, handlers.kinds.classify), against a tiny fixed-weight
model: parsing (JSON and binary tensors), every error a 4xx with the protocol's body, rows split into passes of
the configured size, native and infer requests answered side by side in one batch."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from handlers import oip
from handlers.kinds.classify import ClassifierConfig, ImageClassifier
from handlers.requests import RequestError
from models.preprocessing import DigitsPreset
from models.runtime import ModuleRunner
from models.samples import encode, render

PNG = encode(render(torch.eye(8).numpy(), polarity="dark-on-light"))
B64 = base64.b64encode(PNG).decode()


def infer(inputs, **extra):
    return {"inputs": inputs, **extra}


def test_json_tensors_parse_flat_or_nested_with_their_shapes():
    request = oip.parse(infer([{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4]]},
                               {"name": "y", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}],
                              id="r", outputs=[{"name": "score"}]))
    assert request.id == "r" and request.outputs == ("score",)
    # an empty id names nothing (gRPC's proto3 sends an unset id as ""): the answer takes the request's ID instead
    assert oip.parse(infer([{"name": "y", "shape": [1], "datatype": "BYTES", "data": ["a"]}], id="")).id is None
    x, y = request.inputs
    assert x.data.dtype == np.float32 and x.data.tolist() == [[1, 2], [3, 4]] and x.rows == 2
    assert y.data == ["a", "b"] and y.shape == (2,)


def test_binary_tensors_follow_the_json_header():
    header = json.dumps(infer([{"name": "px", "shape": [1, 2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
                               {"name": "t", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 11}}]))
    raw = header.encode() + bytes([7, 250]) + struct.pack("<I", 2) + b"hi" + struct.pack("<I", 1) + b"!"
    request = oip.parse_binary(raw, len(header.encode()))
    assert request.inputs[0].data.tolist() == [[7, 250]] and request.inputs[1].data == [b"hi", b"!"]


@pytest.mark.parametrize("body, match", [
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, "holds 2 values, data has 1"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}, "datatype 'FLOAT'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]}, "not UINT8"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": ["1"]}]}, "must be numbers"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}, "must be strings"),
    ({"inputs": [{"name": "x", "shape": "1", "datatype": "BYTES", "data": ["a"]}]}, "shape"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}, "no 'data'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "id": 3}, "'id'"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2}, "repeat"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}, "does not fit"),
])
def test_malformed_requests_are_400_with_the_protocols_error_body(body, match):
    with pytest.raises(RequestError, match=match) as info:
        oip.parse(body)
    assert info.value.status == 400 and set(json.loads(info.value.body())) == {"error"}


def test_a_header_length_past_the_body_is_refused():
    with pytest.raises(RequestError, match="does not fit"):
        oip.parse_binary(b'{"inputs": []}', 500)


class Brightness(nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        mean = image.mean(dim=(1, 2, 3))
        return torch.stack([-mean, mean], dim=1) * 10


@pytest.fixture
def classifier():
    model = Brightness().eval()
    calls: list[int] = []

    def runner(inputs):
        calls.append(inputs[0].shape[0])
        return ModuleRunner(model)(inputs)

    pipeline = ImageClassifier(runner, DigitsPreset(), ["dark", "bright"],
                               ClassifierConfig(topk=2, max_rows_per_pass=3, max_rows_per_request=8),
                               input_shape=(1, 32, 32), served_as=("digits", "1.0"))
    pipeline.calls = calls
    return pipeline


def test_native_and_infer_requests_share_a_batch_and_rows_are_split_into_passes(classifier):
    dark = encode(render(torch.zeros(8, 8).numpy()))
    rows = [B64, base64.b64encode(dark).decode(), B64, B64]
    requests = [{"body": PNG},
                {"body": infer([{"name": "image", "shape": [4], "datatype": "BYTES", "data": rows}], id="a")},
                {"body": infer([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["@@"]}], id="bad")},
                {"body": infer([{"name": "image", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.5] * 1024}],
                               outputs=[{"name": "index"}])}]
    results = classifier.process(requests, ["image/png", "application/json", "application/json", "application/json"])
    assert classifier.calls == [3, 3], "6 rows in passes of at most max_rows_per_pass = 3"
    assert [p["label"] for p in json.loads(results[0])] == ["dark", "bright"]
    answer = json.loads(results[1])
    assert answer["id"] == "a" and answer["model_name"] == "digits" and answer["model_version"] == "1.0"
    label, index, score = answer["outputs"]
    assert (label["name"], label["datatype"], label["shape"]) == ("label", "BYTES", [4, 2])
    assert (index["datatype"], score["datatype"]) == ("INT64", "FP32") and len(score["data"]) == 8
    assert label["data"][0:2] == [p["label"] for p in json.loads(results[0])]
    assert isinstance(results[2], RequestError) and results[2].status == 400
    assert json.loads(results[2].body()) == {"error": "row 0 is not valid base64"}
    only = json.loads(results[3])
    assert [o["name"] for o in only["outputs"]] == ["index"] and "id" not in only


def test_pixels_are_resized_by_the_preset_and_checked_like_images(classifier):
    pixels = np.full((1, 40, 24, 3), 255, dtype=np.uint8)
    pixels[0, 8:32, 10:14] = 0
    answer = classifier.process([{"body": infer([{"name": "image", "shape": list(pixels.shape), "datatype": "UINT8",
                                                  "data": pixels.ravel().tolist()}])}], ["application/json"])[0]
    assert json.loads(answer)["outputs"][1]["shape"] == [1, 2]
    tiny = np.zeros((1, 2, 2, 1), dtype=np.uint8)
    refused = classifier.process([{"body": infer([{"name": "image", "shape": [1, 2, 2, 1], "datatype": "UINT8",
                                                   "data": tiny.ravel().tolist()}])}], ["application/json"])[0]
    assert refused.status == 400 and "row 0" in json.loads(refused.body())["error"]


@pytest.mark.parametrize("tensor, status, match", [
    ({"name": "image", "shape": [9], "datatype": "BYTES", "data": [B64] * 9}, 413, "at most 8"),
    ({"name": "image", "shape": [1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}, 400, "FP32 \\[None, 1, 32, 32\\]"),
    ({"name": "image", "shape": [1, 4], "datatype": "INT32", "data": [1, 2, 3, 4]}, 400, "INT32"),
])
def test_an_input_the_model_cannot_take_names_the_forms_it_can(classifier, tensor, status, match):
    result = classifier.process([{"body": infer([tensor])}], ["application/json"])[0]
    assert isinstance(result, RequestError) and result.status == status
    assert result.oip and __import__("re").search(match, json.loads(result.body())["error"])


def test_an_unknown_output_is_refused_before_inference(classifier):
    result = classifier.process([{"body": infer([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}],
                                                outputs=[{"name": "logits"}])}], ["application/json"])[0]
    assert result.status == 400 and "unknown output 'logits'" in json.loads(result.body())["error"]
    assert classifier.calls == []


def test_with_no_media_type_json_bytes_are_read_as_json(classifier):
    """A gRPC Predictions call: the input map's one entry, no Content-Type."""
    body = json.dumps(infer([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [B64]}])).encode()
    native = json.dumps({"image": B64}).encode()
    oip_answer, native_answer, raw = classifier.process([{"data": body}, {"data": native}, {"data": PNG}], ["", "", ""])
    assert json.loads(oip_answer)["outputs"][0]["data"] == [p["label"] for p in json.loads(raw)]
    assert json.loads(native_answer) == json.loads(raw)


def _read_by_triton(answer):
    """An answer read back by tritonclient's own parser (a client we did not write), binary or JSON."""
    from tritonclient.http import InferResult

    if isinstance(answer, oip.BinaryAnswer):
        return InferResult.from_response_body(answer.body, header_length=answer.header_length)
    return InferResult.from_response_body(answer.encode())


def _output(result, name: str) -> np.ndarray:
    """An output as NumPy; BYTES elements as text (tritonclient gives bytes from binary data, str from JSON)."""
    array = result.as_numpy(name)
    if array.dtype == object:
        array = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    return array


def test_outputs_asked_in_binary_come_back_raw_and_read_as_the_json_ones():
    tensors = [oip.Tensor("mask", "UINT8", (2, 2, 3), np.arange(12, dtype=np.uint8).reshape(2, 2, 3)),
               oip.Tensor("score", "FP32", (2, 2), [0.25, -1.5, 3.0, 1e-7]),
               oip.Tensor("index", "INT64", (2,), [7, -(2 ** 40)]),
               oip.Tensor("truncated", "BOOL", (2,), [True, False]),
               oip.Tensor("label", "BYTES", (2, 2), ["star", "", "ring", "crème"])]
    names = [{"name": t.name} for t in tensors]
    as_json = oip.response("m", "1", oip.parse(infer([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                                                      outputs=names)), tensors)
    assert isinstance(as_json, str) and "parameters" not in as_json
    every = oip.parse(infer([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                            parameters={"binary_data_output": True}))
    some = oip.parse(infer([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}],
                           parameters={"binary_data_output": True},
                           outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "mask"}]))
    expected = _read_by_triton(as_json)
    for request, binary_names in ((every, {t.name for t in tensors}), (some, {"mask"})):
        answer = oip.response("m", "1", request, tensors)
        assert isinstance(answer, oip.BinaryAnswer)
        header = json.loads(answer.body[:answer.header_length])
        assert {o["name"] for o in header["outputs"] if "parameters" in o} == binary_names
        assert all("data" not in o for o in header["outputs"] if o["name"] in binary_names)
        got = _read_by_triton(answer)
        for o in header["outputs"]:
            assert _output(got, o["name"]).dtype == _output(expected, o["name"]).dtype
            assert np.array_equal(_output(got, o["name"]), _output(expected, o["name"])), o["name"]
        assert [o["name"] for o in header["outputs"]] == ([t.name for t in tensors] if request is every else ["label", "mask"])


@pytest.mark.parametrize("extra, match", [
    ({"parameters": {"binary_data_output": "yes"}}, "binary_data_output must be true or false"),
    ({"parameters": []}, "parameters must be an object"),
    ({"outputs": [{"name": "index", "parameters": {"binary_data": 1}}]}, "binary_data must be true or false"),
])
def test_a_binary_flag_that_is_not_a_boolean_is_a_400(extra, match):
    with pytest.raises(RequestError, match=match) as info:
        oip.parse(infer([{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}], **extra))
    assert info.value.status == 400


def test_a_pipeline_answers_binary_outputs_beside_json_ones_in_one_batch(classifier):
    row = [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [B64, B64]}]
    binary, plain = classifier.process([{"body": infer(row, parameters={"binary_data_output": True})},
                                        {"body": infer(row)}], ["application/json", "application/json"])
    assert isinstance(binary, oip.BinaryAnswer) and isinstance(plain, str)
    got, expected = _read_by_triton(binary), _read_by_triton(plain)
    for name in ("label", "index", "score"):
        assert np.array_equal(_output(got, name), _output(expected, name)), name


def test_an_answer_without_an_id_takes_the_request_id_and_one_with_an_id_keeps_it():
    """KServe's servers answer a request that names no id with one of theirs: here the request's X-Request-ID
    (handlers.adapter). JSON and binary answers alike; errors and native answers are left alone."""
    outputs = [oip.Tensor("y", "FP32", (1, 2), np.array([[1.5, -2.0]], dtype=np.float32))]
    plain = oip.parse(infer([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]))
    named = oip.parse(infer([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}], id="client-1"))
    answer = oip.with_id(oip.response("m", "1", plain, outputs), "req-7")
    assert json.loads(answer) == {"model_name": "m", "model_version": "1", "id": "req-7",
                                  "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.5, -2.0]}]}
    kept = oip.with_id(oip.response("m", "1", named, outputs), "req-7")
    assert json.loads(kept)["id"] == "client-1"
    binary = oip.parse(infer([{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                             parameters={"binary_data_output": True}))
    raw = oip.response("m", "1", binary, outputs)
    stamped = oip.with_id(raw, 'a"b')
    head = json.loads(stamped.body[:stamped.header_length])
    assert head["id"] == 'a"b' and stamped.body[stamped.header_length:] == raw.body[raw.header_length:]
    for other in ('{"error": "no"}', '[{"label": "7", "score": 0.9}]', RequestError(400, "X", "no")):
        assert oip.with_id(other, "req-7") is other
