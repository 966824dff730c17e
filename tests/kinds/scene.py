"""What the test tiers check of a scene model's answers (the object-detector and image-segmenter kinds,
handlers/kinds/detect.py and segment.py): the kind's own pipeline run in-process on the eager checkpoint is the
reference a served answer must equal. The scene models are opt-in (not among the models every generic tier
serves), so their tiers (tests/integration/test_scene_kinds.py, tests/handler) use these directly."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from handlers.kinds.detect import VERIFY_MARGIN as TIE  # scores this close tie; also the tolerance on scores
from handlers.kinds.segment import parse as mask_of  # a native mask answer read back
from models.paths import current, model_config_values


SCENE_KINDS = ("object-detector", "image-segmenter")
# The quick detector (`make test`) scores its peaks near its prior, about 0.09 to 0.11, under the shipped threshold
# (0.3): the test tiers serve it with a lower one, so that answers carry detections to check (18 a scene on average
# over its 100 held-out scenes).
TEST_HANDLER = {"object-detector": {"score_threshold": 0.1}}


def handler_settings(spec) -> dict:
    """The handler settings the test tiers serve `spec` with: its model-config YAML's, with TEST_HANDLER's changes."""
    return {**model_config_values(spec.name)["handler"], **TEST_HANDLER.get(spec.kind, {})}


def shown_size(body: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes as shown (EXIF orientation applied)."""
    from models.preprocessing import shown_size as of_image

    return of_image(Image.open(io.BytesIO(body)))


class Reference:
    """The kind's pipeline in-process with the eager checkpoint of the build tree as its model and the test tiers'
    handler settings (loadtest.evaluate.eager_pipeline)."""

    def __init__(self, spec) -> None:
        from loadtest.evaluate import eager_pipeline

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


def same(spec, a, b) -> None:
    """Two answers of `spec`'s kind to one request agree."""
    if spec.kind == "object-detector":
        settings = handler_settings(spec)
        same_detections(a, b, settings["score_threshold"], settings["max_detections"])
    else:
        same_masks(a, b)
