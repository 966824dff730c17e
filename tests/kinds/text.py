"""Test checks of the text-embedding kind (handlers/kinds/text.py): answers against sentence-transformers."""

from __future__ import annotations

import json
from functools import cache

import numpy as np

from tests.conftest import SentenceReference
from tests.ops import bad_inputs


def text_of(payload) -> str:
    return json.loads(payload.body)["text"] if payload.content_type == "application/json" else payload.body.decode()


@cache
def reference() -> SentenceReference:
    return SentenceReference()


class Checks:
    native_errors = "native"  # {"code", "type", "message"} at the native route

    def __init__(self, spec) -> None:
        self.spec = spec

    def assert_native(self, payloads, answers) -> None:
        reference().assert_matches([a["embedding"] for a in answers], [text_of(p) for p in payloads])

    def same(self, a, b) -> None:
        """One text's answer, or a list's ({"embeddings": [...]}): the same tokens, vectors within 1e-5."""
        left, right = a.get("embeddings", [a]), b.get("embeddings", [b])
        assert len(left) == len(right)
        for x, y in zip(left, right):
            assert x["tokens"] == y["tokens"]
            assert max(abs(u - v) for u, v in zip(x["embedding"], y["embedding"])) <= 1e-5

    def oip_inputs(self, payloads, *, binary: bool):
        return [("text", "BYTES", np.array([text_of(p).encode() for p in payloads], dtype=object))]

    def assert_oip(self, outputs, native) -> None:
        expected = np.array([a["embedding"] for a in native])
        assert outputs["embedding"].shape == expected.shape == (len(native), 384)
        assert np.abs(outputs["embedding"] - expected).max() <= 1e-5
        assert outputs["tokens"].tolist() == [a["tokens"] for a in native]
        assert outputs["truncated"].tolist() == [a["truncated"] for a in native]

    some_outputs = ["tokens"]

    def good_infer(self, payload) -> bytes:
        text = text_of(payload)
        return json.dumps({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [text, text]}]}).encode()

    def json_forms(self, payload):
        text = text_of(payload)
        return (json.dumps({"texts": [text, "second"]}).encode(),
                {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]})

    def bad_matrix(self, handler, max_request: int):
        return bad_inputs.text_matrix(handler["max_texts_per_request"], handler["max_text_chars"], max_request)

    def oip_matrix(self, handler):
        return bad_inputs.oip_matrix(False, (), handler["max_texts_per_request"])
