"""Fuzzing, in-process and bounded: the image decoder and the request parsers take arbitrary bytes and
JSON; nothing but the project's own error types may come out (InvalidImage / ImageTooLarge from the
decoder, RequestError from the parsers), and Pillow's decompression-bomb guard stays on throughout. Texts
and infer requests are fuzzed with everything JSON allows (lone surrogates, NUL, any code point, deep nesting,
long numbers): a text the parser accepts must also pass the real tokenizer, which tokenizes a whole batch in
one call, so a text it refused would fail every request batched with it."""

from __future__ import annotations

import io
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handlers import oip
from handlers.images import extract_image_bytes
from handlers.kinds.classify import ClassifierConfig, ImageClassifier
from handlers.requests import RequestError, parse_json_body
from handlers.kinds.text import EmbeddingConfig, extract_texts
from models.preprocessing import InvalidImage, build_preset, decode_image
from models.text import TextPreset
from tests.conftest import ROOT, TREE, built

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


# Any code point, surrogates (category Cs) included: json.dumps writes them as \\uD800-style escapes, which JSON
# allows and Python parses back into such code points.
ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=24)
ANY_TEXT_BYTES = ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass"))  # surrogates as (invalid) UTF-8
HOSTILE_JSON = st.one_of(
    st.builds(lambda n, c: (c * n).encode(), st.integers(900, 50_000), st.sampled_from(["[", '{"a":'])),
    st.builds(lambda n: ('{"text": ' + "9" * n + "}").encode(), st.integers(4000, 6000)),
    st.builds(lambda t: json.dumps({"text": t}).encode(), ANY_TEXT),
    st.builds(lambda ts: json.dumps({"texts": ts}).encode(), st.lists(ANY_TEXT, min_size=1, max_size=3)))


@pytest.fixture(scope="module")
def tokenizer() -> TextPreset:
    return TextPreset(built(TREE.artifacts("minilm") / "tokenizer.json"), max_length=256)


@FUZZ
@given(body=st.one_of(HOSTILE_JSON, ANY_TEXT_BYTES),
       content_type=st.sampled_from(["", "application/json", "text/plain"]))
def test_any_text_is_refused_alone_or_tokenized(tokenizer, body, content_type):
    try:
        texts, _ = extract_texts({"body": body}, content_type, EmbeddingConfig(max_texts_per_request=3))
    except RequestError as err:
        assert 400 <= err.status < 500 and err.body()
        return
    tokenizer.encode(["a neighbour in the same batch", *texts])


@FUZZ
@given(data=st.one_of(HOSTILE_JSON, st.binary(max_size=64), ANY_TEXT_BYTES))
def test_the_json_reader_raises_only_request_errors(data):
    try:
        parse_json_body(data)
    except RequestError as err:
        assert err.status == 400 and err.kind == "InvalidJSON"


TENSORS = st.fixed_dictionaries({
    "name": st.one_of(st.text(max_size=4), JSON_VALUES),
    "datatype": st.one_of(st.sampled_from(list(oip.DATATYPES)), JSON_VALUES),
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=3), JSON_VALUES),
    "data": st.one_of(JSON_VALUES, st.lists(st.one_of(st.integers(), st.floats(), ANY_TEXT, st.booleans()),
                                            max_size=6))})


@FUZZ
@given(body=st.one_of(JSON_VALUES, st.fixed_dictionaries({"inputs": st.lists(TENSORS, max_size=3)}, optional={
    "outputs": JSON_VALUES, "id": JSON_VALUES})), binary=st.binary(max_size=32))
def test_infer_request_parsing_raises_only_request_errors(body, binary):
    try:
        oip.parse(body, binary)
    except RequestError as err:
        assert 400 <= err.status < 500 and err.oip and err.body()


def test_pillow_bomb_guard_stays_on():
    """Nothing in the project turns Pillow's decompression-bomb guard off; limits are per model instead."""
    import handlers.handler  # noqa: F401  (import everything that could touch it)
    import handlers.images  # noqa: F401
    import handlers.kinds.classify  # noqa: F401
    import handlers.kinds.tensor  # noqa: F401
    import handlers.kinds.text  # noqa: F401
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
