"""Test checks of the image-classifier kind (handlers/kinds/classify.py): answers against the eager checkpoint."""

from __future__ import annotations

import pytest

from tests.conftest import ClassifierReference
from tests.kinds.images import ImageChecks


class Checks(ImageChecks):
    def assert_native(self, payloads, answers) -> None:
        reference = ClassifierReference(self.spec.name)
        for payload, answer in zip(payloads, answers, strict=True):
            reference.assert_matches(answer, payload.body)

    def same(self, a, b) -> None:
        assert a == b

    def assert_oip(self, outputs, native) -> None:
        k, rows = len(native[0]), len(native)
        assert outputs["label"].shape == outputs["index"].shape == outputs["score"].shape == (rows, k)
        for row, answer in enumerate(native):
            assert [x.decode() if isinstance(x, bytes) else x for x in outputs["label"][row]] == [p["label"] for p in answer]
            assert outputs["index"][row].tolist() == [p["index"] for p in answer]
            assert outputs["score"][row].tolist() == pytest.approx([p["score"] for p in answer], abs=1e-6)

    some_outputs = ["score", "label"]
