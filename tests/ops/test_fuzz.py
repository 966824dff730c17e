"""Fuzzing, in-process and bounded: the image decoder and the request parsers take arbitrary bytes and
JSON; nothing but the project's own error types may come out (InvalidImage / ImageTooLarge from the
decoder, RequestError from the parsers), and Pillow's decompression-bomb guard stays on throughout."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handlers.image import ClassifierConfig, ImageClassifier, extract_image_bytes
from handlers.requests import RequestError
from handlers.text import EmbeddingConfig, extract_texts
from models.preprocessing import InvalidImage, build_preset, decode_image
from tests.conftest import ROOT

pytestmark = pytest.mark.ops
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _seed_images() -> list[bytes]:
    out = []
    for fmt, mode in (("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "L")):
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((24, 16)).convert(mode).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = _seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    """A real image of one of six formats with some bytes overwritten, cut short or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut] if draw(st.booleans()) else data) + draw(st.binary(max_size=16))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["image", "text", "texts", "data", "x"]) | st.text(max_size=5), children, max_size=4),
    max_leaves=12)
CONTENT_TYPES = st.sampled_from(["", "image/png", "application/json", "text/plain", "application/octet-stream",
                                 "application/x-www-form-urlencoded", "multipart/form-data", "text/html"])


@FUZZ
@given(data=st.one_of(mutated_images(), st.binary(max_size=256)))
def test_decoder_raises_only_its_own_errors(data):
    try:
        image = decode_image(data, max_pixels=1_000_000, min_side=1, allow_animated=False)
    except InvalidImage:  # ImageTooLarge is a subclass
        return
    assert image.width * image.height <= 1_000_000


CLASSIFIER = ImageClassifier(lambda inputs: [], build_preset({"name": "digits"}), [str(i) for i in range(10)],
                             ClassifierConfig(max_image_bytes=4096, max_image_pixels=100_000))


@FUZZ
@given(body=st.one_of(mutated_images(), st.binary(max_size=64), st.text(max_size=64), JSON_VALUES),
       content_type=CONTENT_TYPES, multipart=st.booleans())
def test_image_request_parsing_raises_only_request_errors(body, content_type, multipart):
    request = {"data": body} if multipart else {"body": body}
    try:
        extract_image_bytes(request, content_type, max_bytes=4096)
        CLASSIFIER.decode(request, content_type)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.body()


@FUZZ
@given(body=st.one_of(st.binary(max_size=64), st.text(max_size=64), JSON_VALUES), content_type=CONTENT_TYPES)
def test_text_request_parsing_raises_only_request_errors(body, content_type):
    try:
        texts, _ = extract_texts({"body": body}, content_type, EmbeddingConfig(max_texts_per_request=3, max_text_chars=40))
    except RequestError as err:
        assert 400 <= err.status < 500 and err.body()
    else:
        assert texts and all(isinstance(t, str) and t.strip() and len(t) <= 40 for t in texts)


def test_pillow_bomb_guard_stays_on():
    """Nothing in the project turns Pillow's decompression-bomb guard off; limits are per model instead."""
    import handlers.classifier_handler  # noqa: F401  (import everything that could touch it)
    import handlers.embedding_handler  # noqa: F401
    import models.samples  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    offenders = [str(p.relative_to(ROOT)) for folder in ("models", "handlers", "export", "loadtest", "serve_config")
                 for p in (ROOT / folder).rglob("*.py") if re.search(r"MAX_IMAGE_PIXELS\s*=", p.read_text())]
    assert offenders == []


def test_nothing_unpickles_untrusted_data():
    """torch.load only with weights_only=True; no pickle, dill or joblib loading anywhere in the project."""
    calls = []
    for folder in ("models", "handlers", "export", "loadtest", "serve_config"):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                    calls.append(f"{path.name}: {line.strip()}")
                if re.search(r"\b(pickle|dill|joblib)\.loads?\(", line):
                    calls.append(f"{path.name}: {line.strip()}")
    assert calls == []
