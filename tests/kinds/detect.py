"""Test checks of the object-detector kind (handlers/kinds/detect.py): detections held to the eager pipeline's."""

from __future__ import annotations

from tests.kinds.scene import SceneChecks, same_detections, text


class Checks(SceneChecks):
    # The quick detector (`make test`) scores its peaks near its prior, about 0.09 to 0.11, under the shipped
    # threshold (0.3): the test tiers serve it with a lower one, so that answers carry detections to check (18 a
    # scene on average over its 100 held-out scenes).
    handler = {"score_threshold": 0.1}

    def same(self, a, b) -> None:
        same_detections(a, b, self.settings["score_threshold"], self.settings["max_detections"])

    def assert_oip(self, outputs, native) -> None:
        """boxes [n, k, 4], scores and labels [n, k], count [n]: each row's first `count` detections are its native
        answer's, the rest padding."""
        rows = len(native)
        count = outputs["count"].tolist()
        k = outputs["scores"].shape[1]
        assert outputs["boxes"].shape == (rows, k, 4) and outputs["labels"].shape == (rows, k) and len(count) == rows
        for row, answer in enumerate(native):
            n = count[row]
            assert not outputs["boxes"][row, n:].any() and not outputs["scores"][row, n:].any()
            assert [text(x) for x in outputs["labels"][row, n:]] == [""] * (k - n)
            served = [{"label": text(outputs["labels"][row, j]), "score": float(outputs["scores"][row, j]),
                       "box": outputs["boxes"][row, j].tolist()} for j in range(n)]
            self.same(served, answer)

    some_outputs = ["count", "scores"]

    def assert_verified(self, figures: dict, tolerance) -> None:
        """An export's verification figures (its build stamp) within the entry's tolerance."""
        assert figures["detections"] > 0 and figures["unmatched"] == figures["extra"] == 0, figures
        assert figures["min_box_iou"] >= tolerance.min_box_iou and figures["max_score_diff"] <= tolerance.max_score_diff
