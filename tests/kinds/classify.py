"""Test checks of the image-classifier kind (handlers/kinds/classify.py): answers against the eager checkpoint."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.conftest import ClassifierReference
from tests.ops import bad_inputs


class Checks:
    native_errors = "native"  # {"code", "type", "message"} at the native route

    def __init__(self, spec) -> None:
        self.spec = spec
        self.input = spec.inputs[0].name

    def assert_native(self, payloads, answers) -> None:
        reference = ClassifierReference(self.spec.name)
        for payload, answer in zip(payloads, answers, strict=True):
            reference.assert_matches(answer, payload.body)

    def same(self, a, b) -> None:
        assert a == b

    def oip_inputs(self, payloads, *, binary: bool):
        """One BYTES input: the encoded images (raw in binary, base64 in JSON)."""
        rows = np.array([p.body if binary else base64.b64encode(p.body) for p in payloads], dtype=object)
        return [(self.input, "BYTES", rows)]

    def assert_oip(self, outputs, native) -> None:
        k, rows = len(native[0]), len(native)
        assert outputs["label"].shape == outputs["index"].shape == outputs["score"].shape == (rows, k)
        for row, answer in enumerate(native):
            assert [x.decode() if isinstance(x, bytes) else x for x in outputs["label"][row]] == [p["label"] for p in answer]
            assert outputs["index"][row].tolist() == [p["index"] for p in answer]
            assert outputs["score"][row].tolist() == pytest.approx([p["score"] for p in answer], abs=1e-6)

    some_outputs = ["score", "label"]

    def good_infer(self, payload) -> bytes:
        row = base64.b64encode(payload.body).decode()
        return json.dumps({"inputs": [{"name": self.input, "shape": [2], "datatype": "BYTES", "data": [row, row]}]}).encode()

    def json_forms(self, payload):
        encoded = base64.b64encode(payload.body).decode()
        return (json.dumps({"image": encoded}).encode(),
                {"inputs": [{"name": self.input, "shape": [1], "datatype": "BYTES", "data": [encoded]}]})

    def bad_matrix(self, handler, max_request: int):
        return bad_inputs.image_matrix(handler["max_image_bytes"], max_request)

    def oip_matrix(self, handler):
        return bad_inputs.oip_matrix(True, tuple(self.spec.inputs[0].example_shape[1:]), handler["max_rows_per_request"],
                                     handler)
