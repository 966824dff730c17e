"""The sentence-embedding pipeline: pure request and batch functions. Nothing here knows about TorchServe.

Accepted request forms (per request):
- a text/plain body (UTF-8): one text;
- JSON `{"text": "..."}`: one text;
- JSON `{"texts": ["...", ...]}`: up to `max_texts_per_request` texts.
Answer: `{"embedding": [...], "tokens": n, "truncated": bool}` for one text, or
`{"embeddings": [{"embedding": [...], "tokens": n, "truncated": bool}, ...]}` for `texts`, in order.

A batch's texts (from all its good requests) are tokenized in one call, ordered by token count and cut
into groups under a token budget, each padded to its own longest text; every group is one forward pass.
A bad request gets its own RequestError and never touches its neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from handlers.requests import Pipeline, RequestError, decode_utf8, parse_json_body, per_request
from handlers.settings import HandlerSettings
from models.text import Encoded, TextPreset, length_groups


@dataclass(frozen=True)
class EmbeddingConfig(HandlerSettings):
    """A text embedder's settings (the `handler:` section of its model-config YAML)."""

    max_texts_per_request: int = 64
    max_text_chars: int = 100_000  # longer texts are refused before tokenizing (tokens past max_length are cut)
    max_batch_tokens: int = 8192  # padded tokens (texts x longest) per forward pass
    max_group_texts: int = 64
    decimals: int = 7  # embedding values are rounded to this many decimals in the JSON answer


def _check_text(value: Any, where: str, config: EmbeddingConfig) -> str:
    if not isinstance(value, str):
        raise RequestError(400, "InvalidText", f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(400, "EmptyText", f"{where} is empty")
    if len(value) > config.max_text_chars:
        raise RequestError(413, "TextTooLong", f"{where} has {len(value)} characters; at most {config.max_text_chars}")
    return value


def _from_json(value: Any, config: EmbeddingConfig) -> tuple[list[str], bool]:
    if not isinstance(value, dict):
        raise RequestError(400, "InvalidJSON", 'JSON body must be an object: {"text": "..."} or {"texts": [...]}, '
                                               f"got {type(value).__name__}")
    if ("text" in value) == ("texts" in value):
        raise RequestError(400, "InvalidJSON", 'JSON body needs exactly one of "text" or "texts"')
    if "text" in value:
        return [_check_text(value["text"], '"text"', config)], False
    texts = value["texts"]
    if not isinstance(texts, list):
        raise RequestError(400, "InvalidJSON", f'"texts" must be a list of strings, got {type(texts).__name__}')
    if not texts:
        raise RequestError(400, "EmptyText", '"texts" is an empty list')
    if len(texts) > config.max_texts_per_request:
        raise RequestError(413, "TooManyTexts", f'"texts" has {len(texts)} entries; at most '
                                                f"{config.max_texts_per_request} per request")
    return [_check_text(t, f'"texts"[{i}]', config) for i, t in enumerate(texts)], True


def extract_texts(request: Mapping[str, Any], content_type: str, config: EmbeddingConfig) -> tuple[list[str], bool]:
    """The texts of one TorchServe request dict and whether it asked with "texts" (a list answer)."""
    if content_type and content_type != "application/json" and not content_type.startswith("text/"):
        raise RequestError(415, "UnsupportedMediaType", f"{content_type} is not accepted; send text/plain (UTF-8) "
                                                        'or application/json {"text": ...} / {"texts": [...]}')
    if not request or "body" not in request or request["body"] in (b"", ""):
        raise RequestError(400, "EmptyRequest", "the request has no body; send text/plain or JSON {\"text\": ...}")
    body = request["body"]
    if content_type == "application/json":
        if isinstance(body, (bytes, bytearray)):  # TorchServe forwards undecodable JSON as raw bytes
            body = parse_json_body(decode_utf8(bytes(body)))
        elif isinstance(body, str):
            body = parse_json_body(body)
        return _from_json(body, config)
    if isinstance(body, (bytes, bytearray)):  # TorchServe forwards text that is not UTF-8 as raw bytes
        body = decode_utf8(bytes(body))
    if not isinstance(body, str):
        raise RequestError(400, "InvalidText", f"unexpected body of type {type(body).__name__}")
    return [_check_text(body, "the text", config)], False


@dataclass
class TextBatch:
    """A batch after parsing and tokenizing: per request an error or None; the flat list of texts."""

    results: list
    encoded: list[Encoded]
    owners: list[int]  # request index of each text
    listed: list[bool]  # per request: answer as a list


class SentenceEncoder(Pipeline[TextBatch, torch.Tensor]):
    """preprocess (parse, tokenize) -> run (length-grouped forward passes) -> postprocess (JSON)."""

    def __init__(self, runner: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]], preset: TextPreset,
                 config: EmbeddingConfig) -> None:
        self.runner, self.preset, self.config = runner, preset, config

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str]) -> TextBatch:
        results: list = [None] * len(requests)
        listed = [False] * len(requests)
        texts: list[str] = []
        owners: list[int] = []
        for idx, (request, content_type) in enumerate(zip(requests, content_types, strict=True)):
            parsed = per_request(idx, "parsing", extract_texts, request, content_type, self.config)
            if isinstance(parsed, RequestError):
                results[idx] = parsed
                continue
            request_texts, listed[idx] = parsed
            texts += request_texts
            owners += [idx] * len(request_texts)
        return TextBatch(results, self.preset.encode(texts) if texts else [], owners, listed)

    def embed(self, encoded: Sequence[Encoded]) -> torch.Tensor:
        """(N, hidden) embeddings in the order of `encoded`, one forward pass per length group."""
        if not encoded:
            return torch.empty((0, 0))
        groups = length_groups([e.tokens for e in encoded], max_tokens=self.config.max_batch_tokens,
                               max_texts=self.config.max_group_texts)
        out: torch.Tensor | None = None
        for group in groups:
            embeddings = self.runner(list(self.preset.collate([encoded[i] for i in group])))[0]
            if out is None:
                out = torch.empty((len(encoded), embeddings.shape[1]), dtype=torch.float32)
            out[group] = embeddings.float()
        return out

    def run(self, batch: TextBatch) -> torch.Tensor:
        """The batch's forward passes, one per length group."""
        return self.embed(batch.encoded)

    def warm_up(self) -> None:
        """One short and one full-length pass."""
        self.embed(self.preset.encode(["warm up", "warm " * 300]))

    def postprocess(self, batch: TextBatch, embeddings: torch.Tensor) -> list[str | RequestError]:
        results = list(batch.results)
        rows = np.round(embeddings.numpy().astype(np.float64), self.config.decimals).tolist() if len(batch.encoded) else []
        items_of: dict[int, list[dict[str, Any]]] = {}
        for owner, encoded, row in zip(batch.owners, batch.encoded, rows, strict=True):
            items_of.setdefault(owner, []).append(
                {"embedding": row, "tokens": encoded.tokens, "truncated": encoded.truncated})
        for idx, items in items_of.items():
            results[idx] = json.dumps({"embeddings": items} if batch.listed[idx] else items[0])
        return results
