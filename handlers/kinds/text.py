"""The sentence-embedding pipeline: pure request and batch functions. Nothing here knows about TorchServe.

Accepted request forms (per request):
- a text/plain body (UTF-8): one text;
- JSON `{"text": "..."}`: one text;
- JSON `{"texts": ["...", ...]}`: up to `max_texts_per_request` texts;
- over gRPC (no media type): the one input's bytes, JSON when they are a JSON object, else UTF-8 text;
- an Open Inference Protocol infer request (handlers.oip): one BYTES input `[n]` of UTF-8 strings.
Answer: `{"embedding": [...], "tokens": n, "truncated": bool}` for one text, or
`{"embeddings": [{"embedding": [...], "tokens": n, "truncated": bool}, ...]}` for `texts`, in order; for
an OIP request, the outputs `embedding` FP32 `[n, hidden]`, `tokens` INT32 `[n]` and `truncated` BOOL `[n]`.

A batch's texts (from all its good requests) are tokenized in one call, ordered by token count and cut
into groups under a token budget, each padded to its own longest text; every group is one forward pass.
A bad request gets its own RequestError and never touches its neighbours.

What tokenizing costs is bounded before it starts, by what it really costs rather than by characters alone:
only the head of a text that can fill the model's tokens is read (models.text.TextPreset.head), a word of more
than `max_word_chars` is refused (413 WordTooLong: WordPiece's search grows with the square of a word's length),
and a batch's tokenizer work (TextPreset.work) is at most `max_batch_work`: a request whose texts alone cost more
gets 413 TextTooCostly, one that does not fit beside its batch's earlier requests 503 ServerBusy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from handlers import oip, openai
from handlers.requests import (Pipeline, RequestError, decode_utf8, json_value, looks_like_json, parse_json_body,
                               per_request, request_body)
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
    max_word_chars: int = 64  # longer words are refused (a sha256 in hex is 64)
    max_batch_work: int = 8_000_000  # tokenizer work per batch (models.text.TextPreset.work): about 0.2 s here

    @property
    def rows_per_pass(self) -> int:
        return self.max_group_texts


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
OUTPUTS = ("embedding", "tokens", "truncated")  # an OIP answer's outputs, in this order


def _check_text(value: Any, where: str, config: EmbeddingConfig) -> str:
    if not isinstance(value, str):
        raise RequestError(400, "InvalidText", f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(400, "EmptyText", f"{where} is empty")
    if len(value) > config.max_text_chars:
        raise RequestError(413, "TextTooLong", f"{where} has {len(value)} characters; at most {config.max_text_chars}")
    if (surrogate := _LONE_SURROGATE.search(value)) is not None:
        # JSON's \uD800-\uDFFF escapes parse to such code points, which are no Unicode characters: the tokenizer
        # refuses them, and would fail the whole batch with this request.
        raise RequestError(400, "InvalidText", f"{where} has a lone UTF-16 surrogate (U+{ord(surrogate.group()):04X} "
                                               f"at character {surrogate.start()}), which is not a Unicode character")
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
    """The texts of one native TorchServe request dict and whether it asked with "texts" (a list answer)."""
    texts, form = parse_request(request, content_type, None, config)
    if isinstance(form, oip.InferRequest):
        raise RequestError(400, "InvalidJSON", "an Open Inference Protocol request is answered at /v2/models/<model>/infer")
    return texts, form == "listed"


def infer_texts(request: oip.InferRequest, config: EmbeddingConfig) -> list[str]:
    """The texts of an OIP request: its one BYTES input of n UTF-8 strings."""
    request.check_outputs(OUTPUTS)
    tensor = request.only_input("text")
    if tensor.datatype != "BYTES" or tensor.shape not in ((tensor.rows,), (tensor.rows, 1)):
        raise oip.invalid(f"input {tensor.name!r} is {tensor.datatype} {list(tensor.shape)}; send BYTES [n] of UTF-8 texts")
    if not tensor.rows:
        raise oip.invalid(f"input {tensor.name!r} has no texts")
    if tensor.rows > config.max_texts_per_request:
        raise oip.invalid(f"input {tensor.name!r} has {tensor.rows} texts; at most {config.max_texts_per_request} per "
                          "request", status=413)
    return [_check_text(decode_utf8(v) if isinstance(v, bytes) else v, f"row {i}", config)
            for i, v in enumerate(tensor.data)]


def _as_oip(action: Callable[..., Any], *args: Any) -> Any:
    try:
        return action(*args)
    except RequestError as err:
        raise err.as_oip() from None


def parse_request(request: Mapping[str, Any], content_type: str, header_length: int | None,
                  config: EmbeddingConfig) -> tuple[list[str], Any]:
    """One request's texts and its form: "single", "listed" (it asked with "texts"), its oip.InferRequest, or, for
    the OpenAI embeddings route, ("openai", encoding format)."""
    if request.get(openai.ROUTE_KEY) == openai.EMBEDDINGS:
        try:
            texts, fmt = openai.embedding_inputs(json_value(request, content_type or "application/json"),
                                                 max_inputs=config.max_texts_per_request)
            return [_check_text(text, f"input {i}", config) for i, text in enumerate(texts)], ("openai", fmt)
        except RequestError as err:
            raise openai.OpenAIError.of(err, param="input") from None
    if header_length is not None:  # the OIP binary tensor extension: raw bytes, JSON header first
        body = request_body(request, content_type)
        infer = oip.parse_binary(bytes(body) if isinstance(body, (bytes, bytearray)) else b"", header_length)
        return _as_oip(infer_texts, infer, config), infer
    if content_type and content_type != "application/json" and not content_type.startswith("text/"):
        raise RequestError(415, "UnsupportedMediaType", f"{content_type} is not accepted; send text/plain (UTF-8) "
                                                        'or application/json {"text": ...} / {"texts": [...]}')
    body = request_body(request, content_type)
    if body is None or body in (b"", ""):
        raise RequestError(400, "EmptyRequest", "the request has no body; send text/plain or JSON {\"text\": ...}")
    value: Any = None
    if content_type == "application/json":  # TorchServe forwards JSON it could not parse as raw bytes
        if isinstance(body, (bytes, bytearray)):
            body = decode_utf8(bytes(body))  # a text model names bad UTF-8 as such (InvalidUTF8)
        value = parse_json_body(body) if isinstance(body, str) else body
    elif not content_type and looks_like_json(body):  # a gRPC call with a JSON object; else it is text
        try:
            value = parse_json_body(body)
        except RequestError:
            value = None
    if oip.is_infer_request(value):
        infer = _as_oip(oip.parse, value)
        return _as_oip(infer_texts, infer, config), infer
    if value is not None:
        texts, listed = _from_json(value, config)
        return texts, "listed" if listed else "single"
    if isinstance(body, (bytes, bytearray)):  # TorchServe forwards text that is not UTF-8 as raw bytes
        body = decode_utf8(bytes(body))
    if not isinstance(body, str):
        raise RequestError(400, "InvalidText", f"unexpected body of type {type(body).__name__}")
    return [_check_text(body, "the text", config)], "single"


@dataclass
class TextBatch:
    """A batch after parsing and tokenizing: per request an error or None; the flat list of texts."""

    results: list
    encoded: list[Encoded]
    owners: list[int]  # request index of each text
    forms: list  # per request: "single", "listed" or its oip.InferRequest


class SentenceEncoder(Pipeline[TextBatch, np.ndarray]):
    """preprocess (parse, tokenize) -> run (length-grouped forward passes) -> postprocess (JSON)."""

    def __init__(self, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]], preset: TextPreset,
                 config: EmbeddingConfig, *, served_as: tuple[str, str] = ("model", "1")) -> None:
        self.runner, self.preset, self.config, self.served_as = runner, preset, config, served_as

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                   header_lengths: Sequence[int | None] | None = None) -> TextBatch:
        results: list = [None] * len(requests)
        forms: list = ["single"] * len(requests)
        texts: list[str] = []
        owners: list[int] = []
        lengths = list(header_lengths) if header_lengths is not None else [None] * len(requests)
        work_left = self.config.max_batch_work
        for idx, (request, content_type, length) in enumerate(zip(requests, content_types, lengths, strict=True)):
            parsed = per_request(idx, "parsing", parse_request, request, content_type, length, self.config)
            if isinstance(parsed, RequestError):
                results[idx] = parsed
                continue
            request_texts, forms[idx] = parsed
            work = per_request(idx, "costing", self.work, request_texts, work_left)
            if isinstance(work, RequestError):
                results[idx] = (work.as_oip() if isinstance(forms[idx], oip.InferRequest) else
                                openai.OpenAIError.of(work) if isinstance(forms[idx], tuple) else work)
                continue
            work_left -= work
            texts += request_texts
            owners += [idx] * len(request_texts)
        return TextBatch(results, self.preset.encode(texts) if texts else [], owners, forms)

    def work(self, texts: Sequence[str], work_left: int) -> int:
        """What tokenizing `texts` costs; RequestError when a word is too long or the cost does not fit in what
        is left of the batch's budget (413 when it would not fit in an empty batch either, else 503)."""
        total = 0
        for i, text in enumerate(texts):
            cost, longest = self.preset.work(self.preset.head(text))
            if longest > self.config.max_word_chars:
                raise RequestError(413, "WordTooLong", f"text {i} has a word of {longest} characters; at most "
                                                       f"{self.config.max_word_chars} (max_word_chars)")
            total += cost
            if total > self.config.max_batch_work:
                raise RequestError(413, "TextTooCostly", f"tokenizing these texts costs more than one batch may "
                                   f"(max_batch_work {self.config.max_batch_work}, passed at text {i}): send fewer "
                                   "texts per request, or texts with shorter words")
        if total > work_left:
            raise RequestError(503, "ServerBusy", "this batch's tokenizer budget is spent by the requests ahead of "
                                                  "this one; retry")
        return total

    def embed(self, encoded: Sequence[Encoded]) -> np.ndarray:
        """(N, hidden) embeddings in the order of `encoded`, one forward pass per length group."""
        if not encoded:
            return np.empty((0, 0), dtype=np.float32)
        groups = length_groups([e.tokens for e in encoded], max_tokens=self.config.max_batch_tokens,
                               max_texts=self.config.max_group_texts)
        out: np.ndarray | None = None
        for group in groups:
            embeddings = self.runner(list(self.preset.collate([encoded[i] for i in group])))[0]
            if out is None:
                out = np.empty((len(encoded), embeddings.shape[1]), dtype=np.float32)
            out[group] = embeddings
        return out

    def run(self, batch: TextBatch) -> np.ndarray:
        """The batch's forward passes, one per length group."""
        return self.embed(batch.encoded)

    def warm_up(self) -> None:
        """One short and one full-length pass."""
        self.embed(self.preset.encode(["warm up", "warm " * 300]))

    def postprocess(self, batch: TextBatch, embeddings: np.ndarray) -> list[str | oip.BinaryAnswer | RequestError]:
        results = list(batch.results)
        rows = np.round(embeddings.astype(np.float64), self.config.decimals).tolist() if len(batch.encoded) else []
        items_of: dict[int, list[dict[str, Any]]] = {}
        for owner, encoded, row in zip(batch.owners, batch.encoded, rows, strict=True):
            items_of.setdefault(owner, []).append(
                {"embedding": row, "tokens": encoded.tokens, "truncated": encoded.truncated})
        for idx, items in items_of.items():
            form = batch.forms[idx]
            if isinstance(form, oip.InferRequest):
                results[idx] = self._infer_response(form, items)
            elif isinstance(form, tuple):  # ("openai", encoding format)
                results[idx] = openai.embeddings_answer(self.served_as[0], np.array([i["embedding"] for i in items]),
                                                        [i["tokens"] for i in items], form[1])
            else:
                results[idx] = json.dumps({"embeddings": items} if form == "listed" else items[0])
        return results

    def _infer_response(self, request: oip.InferRequest, items: list[dict[str, Any]]) -> str | oip.BinaryAnswer:
        rows, width = len(items), len(items[0]["embedding"])
        outputs = [oip.Tensor("embedding", "FP32", (rows, width), [v for i in items for v in i["embedding"]]),
                   oip.Tensor("tokens", "INT32", (rows,), [i["tokens"] for i in items]),
                   oip.Tensor("truncated", "BOOL", (rows,), [i["truncated"] for i in items])]
        return oip.response(*self.served_as, request, outputs)


Settings = EmbeddingConfig


def signature(export_manifest: dict, settings: EmbeddingConfig) -> dict:
    """What an infer request takes and its answer gives, as OIP model metadata lists them (-1: any size)."""
    width = export_manifest["output_specs"][0]["shape"][-1]
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": name, "datatype": datatype, "shape": shape} for name, datatype, shape in
                        zip(OUTPUTS, ("FP32", "INT32", "BOOL"), ([-1, width], [-1], [-1]), strict=True)],
            "openai": [openai.EMBEDDINGS]}


def build(model_dir, export_manifest: dict, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
          settings: EmbeddingConfig, *, served_as: tuple[str, str], max_batch: int) -> SentenceEncoder:
    """The kind's pipeline for an exported model: its tokenizer (an asset beside the model) from the export
    manifest's text preset."""
    from pathlib import Path

    return SentenceEncoder(runner, TextPreset.from_description(export_manifest["preset"], Path(model_dir)), settings,
                           served_as=served_as)
