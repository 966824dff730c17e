"""What the test Checks of the image kinds share (tests/kinds/classify.py, detect.py, segment.py, as their
handlers/kinds modules share handlers/images.py): an encoded image in, raw, multipart, JSON base64 or an OIP BYTES
row, and the image kinds' bad-request matrices."""

from __future__ import annotations

import base64
import json

import numpy as np

from tests.ops import bad_inputs


class ImageChecks:
    native_errors = "native"  # {"code", "type", "message"} at the native route

    def __init__(self, spec) -> None:
        self.spec = spec
        self.input = spec.inputs[0].name

    def oip_inputs(self, payloads, *, binary: bool):
        """One BYTES input: the encoded images (raw in binary, base64 in JSON)."""
        rows = np.array([p.body if binary else base64.b64encode(p.body) for p in payloads], dtype=object)
        return [(self.input, "BYTES", rows)]

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
