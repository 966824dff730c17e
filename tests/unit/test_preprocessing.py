"""The shared preprocessing module: decoding limits, every image mode, polarity, framing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import load_digits_split
from models.preprocessing import DigitsPreset, ImageTooLarge, InvalidImage, build_preset, decode_image, to_gray_array
from models.samples import encode, render

PRESET = DigitsPreset()


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A real held-out digit, quantised to 8 bits so lossless encodings reproduce it exactly."""
    image = load_digits_split().test_images[0]
    return np.round(image * 255) / 255


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one row of data: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is a text file, not an image", "not a recognised image"),
    (encode(Image.new("L", (40, 40), 255))[:60], "could not be decoded"),
])
def test_decode_rejects_bad_bytes(data, message):
    with pytest.raises(InvalidImage, match=message):
        decode_image(data, max_pixels=10**6)


@pytest.mark.parametrize("side, message", [
    (5_000, "5000x5000 = 25000000 pixels; this model accepts at most 16777216"),  # our per-model limit
    (100_000, "too large to decode safely"),  # past Pillow's own guard, which stays on
])
def test_decode_refuses_bomb_from_header_without_decoding(side, message):
    with pytest.raises(ImageTooLarge, match=message):
        decode_image(png_header_only(side, side), max_pixels=16 * 1024 * 1024)


def test_decode_limit_is_per_call_and_leaves_pillow_guard_alone():
    before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("L", (300, 300), 0))
    with pytest.raises(ImageTooLarge):
        decode_image(data, max_pixels=300 * 300 - 1)
    assert decode_image(data, max_pixels=300 * 300).size == (300, 300)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "1", "CMYK", "LA"])
def test_every_mode_gives_the_same_tensor(digit, mode):
    reference = PRESET(render(digit, mode="L", polarity="dark-on-light"))
    if mode in ("1", "CMYK", "LA"):
        image = render(digit, mode="L", polarity="dark-on-light").convert(mode)
    else:
        image = render(digit, mode=mode, polarity="dark-on-light")
    tensor = PRESET(decode_image(encode(image, "TIFF" if mode == "CMYK" else "PNG"), max_pixels=10**7))
    assert tensor.shape == (1, 32, 32)
    bound = 0.2 if mode == "1" else 0.02  # a 1-bit image keeps only the stroke shape
    assert np.abs(tensor - reference).mean() < bound


def test_sixteen_bit_is_scaled_not_clipped(digit):
    gray = to_gray_array(render(digit, mode="I;16", polarity="dark-on-light"))
    assert gray.max() == pytest.approx(1.0) and 0.0 <= gray.min() < 0.1


def test_transparent_canvas_reads_as_paper():
    canvas = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # fully transparent black
    canvas.paste((0, 0, 0, 255), (28, 8, 36, 56))  # an opaque black stroke: a "1"
    gray = to_gray_array(canvas)
    assert gray[0, 0] == 1.0 and gray[30, 32] == 0.0


def test_polarity_dark_on_light_equals_light_on_dark(digit):
    dark_ink = PRESET(render(digit, polarity="dark-on-light"))
    light_ink = PRESET(render(digit, polarity="light-on-dark"))
    assert np.allclose(dark_ink, light_ink, atol=1e-5)


def test_small_digit_on_big_canvas_is_framed_like_the_training_data(digit):
    big = np.kron(digit, np.ones((4, 4), dtype=np.float32))  # (32, 32)
    tight = PRESET.from_array(big)
    canvas = np.zeros((200, 300), dtype=np.float32)
    canvas[120:152, 40:72] = big  # off-centre on a large canvas
    framed = PRESET.from_array(0.1 + 0.7 * canvas)  # grey paper, faint ink
    assert np.abs(framed - tight).max() < 1e-4


def test_blank_image_is_a_valid_uniform_input():
    tensor = PRESET(Image.new("L", (50, 50), 255))
    assert np.isfinite(tensor).all() and np.unique(tensor).size == 1


def test_exif_rotation_is_applied():
    image = Image.new("L", (40, 20), 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert to_gray_array(decode_image(buffer.getvalue(), max_pixels=10**6)).shape == (40, 20)


def test_build_preset_names_the_known_presets():
    assert isinstance(build_preset({"name": "digits", "size": 32}), DigitsPreset)
    with pytest.raises(ValueError, match="known presets: digits"):
        build_preset({"name": "nope"})
    with pytest.raises(ValueError, match="margin"):
        DigitsPreset(margin=0.7)
