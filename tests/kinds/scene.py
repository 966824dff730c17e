"""What the test Checks of the scene kinds share (tests/kinds/detect.py and segment.py, for the object-detector and
image-segmenter kinds of handlers/kinds/detect.py and segment.py): the kind's own pipeline run in-process on the
eager checkpoint is the reference a served answer must equal; images go in as the image kinds' do."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from handlers.kinds.detect import VERIFY_MARGIN as TIE  # scores this close tie; also the tolerance on scores
from handlers.kinds.segment import parse as mask_of  # a native mask answer read back
from models.paths import current
from tests.kinds.images import ImageChecks


def shown_size(body: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes as shown (EXIF orientation applied)."""
    from models.preprocessing import shown_size as of_image

    return of_image(Image.open(io.BytesIO(body)))


class Reference:
    """The kind's pipeline in-process with the eager checkpoint of the build tree as its model and the test tiers'
    handler settings (loadtest.evaluate.eager_pipeline)."""

    def __init__(self, spec) -> None:
        from loadtest.evaluate import eager_pipeline
        from tests.kinds import handler_settings

        self.pipeline = eager_pipeline(spec, current().checkpoint(spec.name), handler_settings(spec))

    def answer(self, body: bytes, content_type: str):
        (result,) = self.pipeline.process([{"body": body}], [content_type])
        return json.loads(result)


def same_detections(a: list[dict], b: list[dict], threshold: float, limit: int) -> None:
    """Both lists hold the same detections (label, score within TIE, box within half a pixel), but for those that
    tie, within TIE, with the threshold or (in a list cut at `limit`) with its last place: either side may rightly
    keep another of the tied peaks there."""
    floor = threshold + TIE
    for answer in (a, b):
        if len(answer) >= limit:
            floor = max(floor, min(d["score"] for d in answer) + TIE)
    for first, second in ((a, b), (b, a)):
        for d in first:
            if d["score"] < floor:
                continue
            partners = [e for e in second if e["label"] == d["label"] and abs(e["score"] - d["score"]) <= TIE
                        and np.abs(np.asarray(e["box"]) - d["box"]).max() <= 0.5]
            assert partners, (d, second)


def same_masks(a: dict, b: dict) -> None:
    """Same size, and at least 99.9 % of the pixels of the same class."""
    assert (a["width"], a["height"]) == (b["width"], b["height"])
    assert (mask_of(a) == mask_of(b)).mean() >= 0.999


class SceneChecks(ImageChecks):
    """What the two scene kinds' Checks share: answers held to the eager pipeline's by the kind's `same`."""

    handler: dict = {}  # handler settings the test tiers serve the kind's models with (over the model config's)

    def __init__(self, spec) -> None:
        from tests.kinds import handler_settings

        super().__init__(spec)
        self.settings = handler_settings(spec)

    def same(self, a, b) -> None:
        raise NotImplementedError

    def assert_native(self, payloads, answers) -> None:
        reference = Reference(self.spec)
        for payload, answer in zip(payloads, answers, strict=True):
            self.same(answer, reference.answer(payload.body, payload.content_type))


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
