"""Test checks of the image-segmenter kind (handlers/kinds/segment.py): masks held to the eager pipeline's."""

from __future__ import annotations

import dataclasses
import io

from PIL import Image, ImageOps

from handlers.kinds.segment import PAD
from loadtest.payloads import payloads
from tests.kinds.scene import SceneChecks, mask_of, same_masks


def shrunk(payload, side: int):
    """`payload` as a PNG of its image (as shown) at most `side` px a side."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(payload.body)))
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return dataclasses.replace(payload, body=buffer.getvalue(), content_type="image/png")


class Checks(SceneChecks):
    def infer_samples(self, count: int) -> list:
        """The model's payloads, each re-encoded as a PNG at most 256 px a side: in OIP's JSON form a mask takes
        about 3 bytes a pixel, so a photo's passes the server's answer bound (a 413; binary outputs carry it)."""
        return [shrunk(p, 256) for p in payloads(self.spec.name, count)]

    def same(self, a, b) -> None:
        same_masks(a, b)

    def assert_oip(self, outputs, native) -> None:
        """mask [n, h, w] (each row's at its top left, padded with 255), size [n, 2] (height, width), fraction
        [n, classes]: each row's mask is its native answer's (as `same` holds two masks: rows of another batch may
        flip a pixel on a boundary), its fractions its native classes within that share."""
        rows = len(native)
        assert outputs["mask"].shape[0] == outputs["size"].shape[0] == outputs["fraction"].shape[0] == rows
        for row, answer in enumerate(native):
            height, width = outputs["size"][row].tolist()
            assert (width, height) == (answer["width"], answer["height"])
            mask = outputs["mask"][row]
            assert (mask[height:, :] == PAD).all() and (mask[:, width:] == PAD).all()
            assert (mask[:height, :width] == mask_of(answer)).mean() >= 0.999
            fractions = outputs["fraction"][row]
            assert abs(float(fractions.sum()) - 1.0) <= 1e-4
            for label, fraction in zip(self.spec.labels, fractions):
                assert abs(answer["classes"].get(label, 0.0) - float(fraction)) <= 1e-3, (label, answer["classes"])

    some_outputs = ["fraction", "mask"]

    def assert_verified(self, figures: dict, tolerance) -> None:
        """An export's verification figures (its build stamp) within the entry's tolerance."""
        assert figures["pixel_agreement"] >= tolerance.min_pixel_agreement, figures
