"""Test checks of the tensor kind (handlers/kinds/tensor.py): infer requests in, named tensors out, answers
against the eager checkpoint run on the same rows. The native route takes the infer request too, and every
error is the protocol's `{"error": ...}`."""

from __future__ import annotations

import json
import math

import numpy as np

from models.kinds import DATATYPES
from tests.conftest import TREE, built
from tests.ops.bad_inputs import JSON, hostile_json

NUMPY = {datatype: np.dtype(name) for name, datatype in DATATYPES.items()}


def binary(body: dict) -> tuple[bytes, int]:
    """A JSON infer request in the binary tensor extension: the JSON header, then each input's raw bytes; and the
    header's length (Inference-Header-Content-Length)."""
    header, blobs = {k: v for k, v in body.items() if k != "inputs"} | {"inputs": []}, []
    for item in body["inputs"]:
        raw = np.asarray(item["data"], dtype=NUMPY[item["datatype"]]).tobytes()
        header["inputs"].append({k: v for k, v in item.items() if k != "data"} | {"parameters": {"binary_data_size": len(raw)}})
        blobs.append(raw)
    text = json.dumps(header).encode()
    return text + b"".join(blobs), len(text)


def arrays_of(body: dict) -> dict[str, np.ndarray]:
    return {i["name"]: np.asarray(i["data"], dtype=NUMPY[i["datatype"]]).reshape(i["shape"]) for i in body["inputs"]}


def outputs_of(answer: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"], dtype=NUMPY[o["datatype"]]).reshape(o["shape"]) for o in answer["outputs"]}


def close(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    if np.issubdtype(a.dtype, np.floating) or np.issubdtype(b.dtype, np.floating):
        return bool(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0) <= atol)
    return bool((a == b).all())


class Checks:
    native_errors = "oip"  # the native route answers in the protocol's error form too

    def __init__(self, spec) -> None:
        self.spec = spec

    def eager(self, body: dict) -> dict[str, np.ndarray]:
        import torch

        from models import checkpoint

        model, _ = checkpoint.load(built(TREE.checkpoint(self.spec.name)), self.spec)
        given = arrays_of(body)
        with torch.inference_mode():
            out = model(*[torch.from_numpy(given[t.name]) for t in self.spec.inputs])
        out = out if isinstance(out, (tuple, list)) else [out]
        return {name: o.numpy() for name, o in zip(self.spec.outputs, out, strict=True)}

    def assert_native(self, payloads, answers) -> None:
        for payload, answer in zip(payloads, answers, strict=True):
            expected, got = self.eager(json.loads(payload.body)), outputs_of(answer)
            assert list(got) == list(self.spec.outputs)
            for name in self.spec.outputs:
                assert close(got[name], expected[name], 1e-4), (name, got[name], expected[name])

    def same(self, a, b) -> None:
        left, right = outputs_of(a), outputs_of(b)
        assert list(left) == list(right) and all(close(left[n], right[n], 1e-5) for n in left)

    def oip_inputs(self, payloads, *, binary: bool):
        rows = [arrays_of(json.loads(p.body)) for p in payloads]
        return [(t.name, DATATYPES[t.dtype], np.concatenate([r[t.name] for r in rows])) for t in self.spec.inputs]

    def assert_oip(self, outputs, native) -> None:
        for name in self.spec.outputs:
            expected = np.concatenate([outputs_of(a)[name] for a in native])
            assert close(np.asarray(outputs[name]), expected, 1e-5), name

    @property
    def some_outputs(self) -> list[str]:
        return list(reversed(self.spec.outputs))

    def good_infer(self, payload) -> bytes:
        body = json.loads(payload.body)
        for item in body["inputs"]:
            item["data"], item["shape"] = item["data"] * 2, [item["shape"][0] * 2, *item["shape"][1:]]
        return json.dumps(body).encode()

    def json_forms(self, payload):
        return None, json.loads(payload.body)

    def first_row(self) -> dict:
        """A well-formed one-row request: every input at its example shape (dynamic axes at 1), zeros."""
        inputs = []
        for t in self.spec.inputs:
            shape = [1, *(1 if a in t.dynamic_axes else s for a, s in enumerate(t.example_shape) if a)]
            inputs.append({"name": t.name, "datatype": DATATYPES[t.dtype], "shape": shape, "data": [0] * math.prod(shape)})
        return {"inputs": inputs}

    def oip_matrix(self, handler):
        """Bad infer requests for this model's inputs: (name, body, headers, status)."""
        good = self.first_row()
        first = self.spec.inputs[0]
        floats = next((t for t in self.spec.inputs if DATATYPES[t.dtype].startswith("FP")), None)

        def changed(**change) -> bytes:
            body = json.loads(json.dumps(good))
            body["inputs"][0].update(change)
            return json.dumps(body).encode()

        width = math.prod(good["inputs"][0]["shape"][1:])
        many = handler.get("max_rows_per_request", 256) + 1
        cases = [
            ("no inputs", json.dumps({"inputs": []}).encode(), JSON, 400),
            ("inputs is not a list", json.dumps({"inputs": {"name": first.name}}).encode(), JSON, 400),
            ("an unknown input", json.dumps({"inputs": good["inputs"] + [{**good["inputs"][0], "name": "nope"}]}).encode(),
             JSON, 400),
            ("an input named twice", json.dumps({"inputs": good["inputs"] + [good["inputs"][0]]}).encode(), JSON, 400),
            ("an unknown datatype", changed(datatype="STRING"), JSON, 400),
            ("another datatype than the model's",
             changed(datatype="INT8" if good["inputs"][0]["datatype"] != "INT8" else "INT16"), JSON, 400),
            ("BYTES for a numeric input", changed(datatype="BYTES", data=["a"] * width), JSON, 400),
            ("a rank too many", changed(shape=[1, 1, *good["inputs"][0]["shape"][1:]]), JSON, 400),
            ("a rank too few", changed(shape=[width]) if len(good["inputs"][0]["shape"]) > 1 else changed(shape=[]),
             JSON, 400),
            ("shape holds more than data", changed(shape=[2, *good["inputs"][0]["shape"][1:]]), JSON, 400),
            ("negative shape", changed(shape=[-1, *good["inputs"][0]["shape"][1:]]), JSON, 400),
            ("strings in numeric data", changed(data=["x"] * width), JSON, 400),
            ("zero rows", changed(shape=[0, *good["inputs"][0]["shape"][1:]], data=[]), JSON, 400),
            ("too many rows", changed(shape=[many, *good["inputs"][0]["shape"][1:]], data=[0] * (many * width)), JSON, 413),
            ("an unknown output", json.dumps({**good, "outputs": [{"name": "nope"}]}).encode(), JSON, 400),
            ("id that is not a string", json.dumps({**good, "id": 5}).encode(), JSON, 400),
            ("binary header length past the body", json.dumps(good).encode(),
             {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "100000"}, 400),
        ]
        if len(self.spec.inputs) > 1:
            cases.append(("a missing input", json.dumps({"inputs": good["inputs"][:1]}).encode(), JSON, 400))
        if floats is not None:
            index = [t.name for t in self.spec.inputs].index(floats.name)
            for label, value in (("NaN", float("nan")), ("Infinity", float("inf"))):
                body = json.loads(json.dumps(good))
                body["inputs"][index]["data"][0] = value
                cases.append((f"{label} in {floats.name}", json.dumps(body).encode(), JSON, 400))
        return cases

    def bad_matrix(self, handler, max_request: int):
        """The native route's bad requests: the OIP matrix, and bodies that are no infer request at all."""
        return [(name, body, headers, status, None) for name, body, headers, status in self.oip_matrix(handler)] + [
            ("empty body", b"", JSON, 400, None),
            ("JSON that does not parse", b'{"inputs": ', JSON, 400, None),
            ("JSON with invalid UTF-8", b'{"inputs": "\xff\xfe"}', JSON, 400, None),
            ("a list, not an object", b"[1, 2, 3]", JSON, 400, None),
            ("an object without inputs", b'{"image": "aGk="}', JSON, 400, None),
            *[(name, body, headers, status, None) for name, body, headers, status, _ in hostile_json("inputs")],
            ("an image", b"\x89PNG\r\n\x1a\n", {"Content-Type": "image/png"}, 415, None),
            ("form-urlencoded body (curl's default)", b"a=1", {"Content-Type": "application/x-www-form-urlencoded"},
             415, None),
            ("over the server's max_request_size", b"\x00" * (max_request + 1), JSON, 413, None),
        ]
