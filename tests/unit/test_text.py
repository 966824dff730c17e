"""Text preprocessing and request parsing for sentence embeddings: pure functions, no server."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest
import torch

from handlers.requests import RequestError
from handlers.kinds.text import EmbeddingConfig, extract_texts
from models import minilm, registry
from models.text import TextPreset, corpus_sentences, length_groups, mixed_texts, padding_fraction

CONFIG = EmbeddingConfig(max_texts_per_request=4, max_text_chars=50)


def cost(lengths, groups, pass_cost=8):
    return sum(pass_cost + len(g) * max(lengths[i] for i in g) for g in groups)


def brute_force_cost(lengths, max_tokens, max_texts, pass_cost=8):
    """Least cost over every way to cut the sorted lengths into consecutive groups."""
    sizes = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product((False, True), repeat=len(sizes) - 1):
        groups, current = [], [0]
        for i, cut in enumerate(cuts, 1):
            if cut:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        if all(len(g) <= max_texts and (len(g) == 1 or len(g) * sizes[g[-1]] <= max_tokens) for g in groups):
            best = min(best, cost(sizes, groups, pass_cost))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_length_groups_are_an_optimal_partition_within_bounds(seed):
    rng = random.Random(seed)
    lengths = [rng.choice((3, 5, 12, 40, 41, 90, 200, 256)) for _ in range(rng.randint(1, 9))]
    groups = length_groups(lengths, max_tokens=400, max_texts=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) <= 3 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 400) for g in groups)
    assert cost(lengths, groups) == brute_force_cost(lengths, 400, 3)


def test_grouping_cuts_the_padding_of_a_mixed_batch():
    lengths = [8, 250, 9, 12, 240, 10, 11, 255]
    grouped = length_groups(lengths, max_tokens=10**6, max_texts=64)
    assert padding_fraction(lengths, grouped) < 0.05 < 0.5 < padding_fraction(lengths, [list(range(8))])
    assert length_groups([7] * 20, max_tokens=10**6, max_texts=64) == [list(range(20))]  # alike: one pass


@pytest.fixture(scope="module")
def preset():
    return TextPreset(minilm.source_dir() / minilm.TOKENIZER, max_length=256)


def test_preset_pads_to_the_longest_and_flags_truncation(preset):
    encoded = preset.encode(["hello world", "a b c d e f g", "word " * 400])
    assert [e.tokens for e in encoded][:2] == [4, 9] and encoded[2].tokens == 256
    assert [e.truncated for e in encoded] == [False, False, True]
    ids, mask = preset.collate(encoded[:2])
    assert ids.shape == mask.shape == (2, 9) and ids.dtype == mask.dtype == np.int64
    assert mask.sum(1).tolist() == [4, 9] and (ids[0, 4:] == 0).all() and (ids[:, 0] == 101).all()


def test_payload_texts_follow_the_documented_length_mix(preset):
    sentences = corpus_sentences()
    assert len(sentences) > 1000 and len(set(sentences)) > 900
    texts = mixed_texts(400)
    lengths = [e.tokens for e in preset.encode(texts)]
    truncated = sum(n == 256 for n in lengths) / len(lengths)
    short = sum(n <= 64 for n in lengths) / len(lengths)
    assert 0.05 <= truncated <= 0.2 and 0.4 <= short <= 0.8 and len(set(texts)) > 350


@pytest.mark.parametrize("request_, ctype, expected, listed", [
    ({"body": "plain text"}, "text/plain", ["plain text"], False),
    ({"body": "héllo ✓".encode()}, "text/plain", ["héllo ✓"], False),
    ({"body": "no type given"}, "", ["no type given"], False),
    ({"body": {"text": "one"}}, "application/json", ["one"], False),
    ({"body": {"texts": ["a", "b"]}}, "application/json", ["a", "b"], True),
    ({"body": b'{"texts": ["x"]}'}, "application/json", ["x"], True),
])
def test_accepted_forms(request_, ctype, expected, listed):
    assert extract_texts(request_, ctype, CONFIG) == (expected, listed)


@pytest.mark.parametrize("request_, ctype, status, kind", [
    ({}, "text/plain", 400, "EmptyRequest"),
    ({"body": ""}, "text/plain", 400, "EmptyRequest"),
    ({"body": "  \n\t"}, "text/plain", 400, "EmptyText"),
    ({"body": b"\xff\xfe\x00bad"}, "text/plain", 400, "InvalidUTF8"),
    ({"body": b'{"text": "\xff"}'}, "application/json", 400, "InvalidUTF8"),
    ({"body": b"{not json"}, "application/json", 400, "InvalidJSON"),
    ({"body": ["a", "b"]}, "application/json", 400, "InvalidJSON"),
    ({"body": {"words": "a"}}, "application/json", 400, "InvalidJSON"),
    ({"body": {"text": "a", "texts": ["b"]}}, "application/json", 400, "InvalidJSON"),
    ({"body": {"text": 5}}, "application/json", 400, "InvalidText"),
    ({"body": {"text": None}}, "application/json", 400, "InvalidText"),
    ({"body": {"texts": "a"}}, "application/json", 400, "InvalidJSON"),
    ({"body": {"texts": []}}, "application/json", 400, "EmptyText"),
    ({"body": {"texts": ["a", 3]}}, "application/json", 400, "InvalidText"),
    ({"body": {"texts": ["a", ""]}}, "application/json", 400, "EmptyText"),
    ({"body": {"texts": ["a"] * 5}}, "application/json", 413, "TooManyTexts"),
    ({"body": "x" * 51}, "text/plain", 413, "TextTooLong"),
    ({"body": b"\x89PNG"}, "image/png", 415, "UnsupportedMediaType"),
])
def test_bad_requests_get_their_own_status(request_, ctype, status, kind):
    with pytest.raises(RequestError) as info:
        extract_texts(request_, ctype, CONFIG)
    assert (info.value.status, info.value.kind) == (status, kind)
    assert json.loads(info.value.body())["code"] == status


def test_config_rejects_unknown_and_bad_settings():
    with pytest.raises(ValueError, match="unknown handler settings"):
        EmbeddingConfig.from_mapping({"max_txts": 3})
    with pytest.raises(ValueError, match="positive integer"):
        EmbeddingConfig.from_mapping({"max_batch_tokens": 0})


def test_source_with_another_sha256_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the published weights")
    with pytest.raises(minilm.SourceError, match="refusing to build"):
        minilm.checked_source(tmp_path)
    with pytest.raises(minilm.SourceError, match="missing"):
        minilm.checked_source(tmp_path / "nowhere")
    assert minilm.checked_source() == minilm.source_dir()  # the installed package is the published file


def test_script_is_really_not_applicable_to_the_embedder():
    """The registry says torch.jit.script does not apply; if scripting ever works, this fails and the entry
    must list `script` as a format instead."""
    spec = registry.get("minilm")
    assert "script" in spec.not_applicable and "script" not in spec.formats
    model = minilm.SentenceEmbedder(minilm.bert_config(minilm.source_dir()))
    with pytest.raises((OSError, RuntimeError, torch.jit.frontend.NotSupportedError)):
        torch.jit.script(model)


def _words(length: int, count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(count))


def test_the_head_of_a_text_tokenizes_exactly_as_the_whole_text(preset):
    """Only the head that can fill max_length is tokenized; ids and `truncated` equal the whole text's, for real
    prose and for texts built to fool a cut (blanks and control characters, marks, CJK, symbols, underscores)."""
    texts = mixed_texts(200, seed=3) + ["\x01 " * 400 + "hello world " * 300, "\u00e9" * 50 + " x" * 300,
                                        "a_b " * 300, "\u4e2d\u6587\u5b57 " * 300, "\u00a9\u00a9 " * 300 + " end",
                                        "\u200b " * 600 + "last words", "\t\n".join(["word"] * 400)]
    whole = [(e.ids, bool(e.overflowing)) for e in preset.tokenizer.encode_batch(texts)]
    assert [(e.ids, e.truncated) for e in preset.encode(texts)] == whole
    assert sum(len(preset.head(t)) < len(t) for t in texts) >= 20  # the cut really happens


def _encoder(preset, **settings):
    from handlers.kinds.text import SentenceEncoder

    def runner(inputs):
        ids, _ = inputs
        return [np.zeros((ids.shape[0], 4), dtype=np.float32)]

    return SentenceEncoder(runner, preset, EmbeddingConfig(**settings))


def test_costly_texts_get_a_fast_413_and_their_neighbours_are_answered(preset):
    """The hardening probe's texts (64 texts of 100,000 characters in words of 99 letters, 17 s alone in the
    tokenizer) are refused before tokenizing, as are words past max_word_chars and texts of words under it whose
    tokenizer work passes the batch's budget; a good request in the same batch is answered."""
    import time

    encoder = _encoder(preset)
    attack = json.dumps({"texts": [_words(99, 1000, seed=i)[:100_000] for i in range(64)]})
    under_the_word_limit = json.dumps({"texts": [_words(60, 1600, seed=i)[:100_000] for i in range(64)]})
    good = json.dumps({"text": "A sentence to embed."})
    started = time.perf_counter()
    answers = encoder.process([{"body": attack}, {"body": under_the_word_limit}, {"body": good}],
                              ["application/json"] * 3)
    elapsed = time.perf_counter() - started
    assert isinstance(answers[0], RequestError) and (answers[0].status, answers[0].kind) == (413, "WordTooLong")
    assert isinstance(answers[1], RequestError) and (answers[1].status, answers[1].kind) == (413, "TextTooCostly")
    assert json.loads(answers[2])["tokens"] == len(preset.encode(["A sentence to embed."])[0].ids)
    print(f"three requests, two refused, in {elapsed:.2f} s")


def test_a_batch_past_its_tokenizer_budget_sheds_the_late_request(preset):
    """Requests that each fit alone but not together: the one past the batch's budget gets 503 to retry."""
    text = json.dumps({"texts": [_words(40, 256, seed=i) for i in range(4)]})  # 4 x 256 x 1600 = 1.6M
    encoder = _encoder(preset, max_batch_work=2_000_000)
    first, second = encoder.process([{"body": text}, {"body": text}], ["application/json"] * 2)
    assert not isinstance(first, RequestError)
    assert isinstance(second, RequestError) and (second.status, second.kind) == (503, "ServerBusy")
