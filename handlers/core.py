"""Pure request and batch functions for image classifiers. Nothing here knows about TorchServe.

One request in, one answer out: `ImageClassifier.process` takes a batch of requests and returns, per
request, either a JSON string of predictions or a `RequestError` that carries its own HTTP status
and JSON body. A bad request never fails its neighbours.

Accepted request forms (per request):
- the raw image bytes as the body (`curl --data-binary @digit.png`);
- a multipart/form-data upload (`curl -F data=@digit.png`; the part named data, file or image, else
  the first file part);
- JSON `{"image": "<base64>"}` (a `data:image/...;base64,` prefix is accepted).
"""

from __future__ import annotations

import base64
import binascii
import http
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch

from models.preprocessing import ImageTooLarge, InvalidImage, decode_for

logger = logging.getLogger(__name__)

PREFERRED_PARTS = ("data", "file", "image")


class RequestError(Exception):
    """A problem with one request: an HTTP status, a short type name and a message for the client."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    @property
    def phrase(self) -> str:
        return http.HTTPStatus(self.status).phrase

    def body(self) -> str:
        return json.dumps({"code": self.status, "type": self.kind, "message": self.message})


@dataclass(frozen=True)
class ClassifierConfig:
    """Per-model serving settings, read from the `handler:` section of the model-config YAML.

    `precision: fp16` runs the model in half precision on a GPU (ignored on a CPU, where it would be
    slower); `allow_tf32` lets CUDA matmuls and convolutions use TF32 (off: parity with the verified
    fp32 export depends on it)."""

    topk: int = 5
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024
    min_image_side: int = 8  # smaller images carry no usable content (and sklearn's digits are 8x8)
    max_aspect_ratio: int = 20  # long side / short side; a 10000x1 strip is no photo of anything
    intra_op_threads: int = 1
    preprocess_threads: int = 1  # decode a batch's images on this many threads (Pillow and torch release the GIL)
    precision: str = "fp32"
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"handler.{f.name} must be a positive integer, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"handler.{f.name} must be true or false, got {value!r}")
        if self.precision not in ("fp32", "fp16"):
            raise ValueError(f"handler.precision must be 'fp32' or 'fp16', got {self.precision!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "ClassifierConfig":
        """Build from the YAML mapping; unknown keys are an error so a typo does not pass silently."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown handler settings {unknown}; known: {sorted(known)}")
        return cls(**values)


def content_type_of(headers: Mapping[str, Any] | None) -> str:
    """The media type (no parameters, lower case) from a header mapping, or ''."""
    for key, value in (headers or {}).items():
        if key.lower() == "content-type" and isinstance(value, str):
            return value.split(";", 1)[0].strip().lower()
    return ""


def per_request(idx: int, what: str, action: Callable[..., Any], *args: Any) -> Any:
    """`action(*args)`'s result, or the RequestError it raised; any other exception (a bug) is logged and
    becomes a 500 for this request alone, never its batch."""
    try:
        return action(*args)
    except RequestError as err:
        return err
    except Exception:
        logger.exception("unexpected error %s request %d", what, idx)
        return RequestError(500, "InternalError", "the request could not be processed")


def content_types(context, count: int) -> list[str]:
    """Each request's body media type from a TorchServe context: kept per input part (the "body" entry)
    beside the request's HTTP headers."""
    types = []
    for idx in range(count):
        headers = context.get_all_request_header(idx) or {}
        part = headers.get("body")
        types.append(content_type_of(part if isinstance(part, dict) else headers))
    return types


def answer_all(context, results: Sequence[str | RequestError]) -> list[str]:
    """Set each request's status and JSON content type on a TorchServe context; return the bodies."""
    answers = []
    for idx, result in enumerate(results):
        context.set_response_content_type(idx, "application/json")
        if isinstance(result, RequestError):
            context.set_response_status(result.status, result.phrase, idx)
            answers.append(result.body())
        else:
            context.set_response_status(200, "OK", idx)
            answers.append(result)
    return answers


def _from_json(value: Any) -> bytes:
    if not isinstance(value, dict):
        raise RequestError(400, "InvalidJSON", f'JSON body must be an object like {{"image": "<base64>"}}, got {type(value).__name__}')
    image = value.get("image")
    if image is None:
        raise RequestError(400, "InvalidJSON", 'JSON body has no "image" field; send {"image": "<base64>"}')
    if not isinstance(image, str):
        raise RequestError(400, "InvalidJSON", f'"image" must be a base64 string, got {type(image).__name__}')
    if image.startswith("data:") and "," in image:
        image = image.split(",", 1)[1]
    try:
        return base64.b64decode(image.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "InvalidBase64", '"image" is not valid base64') from None


def _from_body(value: Any, content_type: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        if content_type == "application/json":  # TorchServe forwards undecodable JSON as raw bytes
            try:
                parsed = json.loads(bytes(value).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RequestError(400, "InvalidJSON", f"the body is not valid JSON: {err}") from None
            return _from_json(parsed)
        return bytes(value)
    if isinstance(value, str):
        if content_type == "application/json":
            return _from_json(parse_json_body(value))
        raise RequestError(400, "UnsupportedInput", f"a {content_type or 'text'} body is not an image; send the image "
                                                    'bytes, a multipart upload, or JSON {"image": "<base64>"}')
    return _from_json(value)  # TorchServe already parsed an application/json body


def parse_json_body(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, "InvalidJSON", f"the body is not valid JSON: {err}") from None


def extract_image_bytes(request: Mapping[str, Any], content_type: str = "", *, max_bytes: int) -> bytes:
    """The image bytes of one TorchServe request dict, whichever of the three forms it came in."""
    if content_type == "application/x-www-form-urlencoded":
        # TorchServe's frontend parses such bodies as HTML forms and drops the raw bytes, so an image
        # sent this way (curl --data-binary without a Content-Type) cannot be recovered here.
        raise RequestError(415, "UnsupportedMediaType",
                           "the body was sent as application/x-www-form-urlencoded (curl's default for --data-binary), "
                           "which the server parses as a form; send the image with -H 'Content-Type: image/png' "
                           "(or application/octet-stream), with curl -T, or as a multipart upload (-F data=@file)")
    if not request:
        raise RequestError(400, "EmptyRequest", "the request has no body")
    if "body" in request:
        data = _from_body(request["body"], content_type)
    else:  # multipart/form-data: one entry per part
        name = next((n for n in PREFERRED_PARTS if n in request), None)
        if name is None:
            name = next((n for n, v in request.items() if isinstance(v, (bytes, bytearray))), None)
        if name is None:
            raise RequestError(400, "UnsupportedInput", f"the multipart request has no file part; "
                                                        f"upload the image as one of {list(PREFERRED_PARTS)}")
        value = request[name]
        data = bytes(value) if isinstance(value, (bytes, bytearray)) else _from_body(value, "")
    if not data:
        raise RequestError(400, "EmptyRequest", "the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise RequestError(413, "PayloadTooLarge", f"the image is {len(data)} bytes; this model accepts at most {max_bytes}")
    return data


def topk_predictions(probs: torch.Tensor, labels: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """(B, C) probabilities -> per row, the top k as [{"label", "index", "score"}], best first."""
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s.tolist(), row_i.tolist())]
        for row_s, row_i in zip(scores, indices)
    ]


@dataclass
class Batch:
    """A batch after preprocessing: per request, an error already decided or a row of `inputs`."""

    results: list  # per request: RequestError, or None until postprocess fills in the answer
    inputs: torch.Tensor | None  # (B, ...) rows for the requests at `positions`; None when none decoded
    positions: list[int]


class ImageClassifier:
    """preprocess (decode, collate) -> infer (one forward pass) -> postprocess (top-k), one answer per request.

    The three stages are separate so the adapter can time each one; `process` runs them in order."""

    def __init__(self, runner: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]], preset: Callable,
                 labels: Sequence[str], config: ClassifierConfig) -> None:
        self.runner, self.preset, self.labels, self.config = runner, preset, list(labels), config
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="decode") \
            if config.preprocess_threads > 1 else None

    def decode(self, request: Mapping[str, Any], content_type: str = "") -> torch.Tensor:
        """One request -> its model input tensor, or RequestError naming what is wrong with it."""
        data = extract_image_bytes(request, content_type, max_bytes=self.config.max_image_bytes)
        try:
            return self.preset(decode_for(self.preset, data, max_pixels=self.config.max_image_pixels,
                                          min_side=self.config.min_image_side,
                                          max_aspect=self.config.max_aspect_ratio, allow_animated=False))
        except ImageTooLarge as err:
            raise RequestError(413, "ImageTooLarge", str(err)) from None
        except InvalidImage as err:
            raise RequestError(400, "InvalidImage", str(err)) from None

    def _decode_or_error(self, idx: int, request: Mapping[str, Any], content_type: str) -> torch.Tensor | RequestError:
        return per_request(idx, "decoding", self.decode, request, content_type)

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str]) -> Batch:
        """Decode every request (on `preprocess_threads` threads); a bad one gets its RequestError and leaves the batch."""
        jobs = list(zip(range(len(requests)), requests, content_types, strict=True))
        if self._pool is not None and len(jobs) > 1:
            decoded = list(self._pool.map(lambda job: self._decode_or_error(*job), jobs))
        else:
            decoded = [self._decode_or_error(*job) for job in jobs]
        results: list = [d if isinstance(d, RequestError) else None for d in decoded]
        positions = [i for i, d in enumerate(decoded) if not isinstance(d, RequestError)]
        tensors = [decoded[i] for i in positions]
        return Batch(results, torch.stack(tensors) if tensors else None, positions)

    def run(self, batch: Batch) -> torch.Tensor | None:
        """The batch's one forward pass (None when no request of it decoded)."""
        return None if batch.inputs is None else self.infer(batch.inputs)

    def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, classes) logits, on the CPU."""
        return self.runner([inputs])[0]

    def predict(self, inputs: torch.Tensor) -> list[list[dict[str, Any]]]:
        """(B, C, H, W) -> top-k predictions per row."""
        return topk_predictions(torch.softmax(self.infer(inputs).float(), dim=1), self.labels, self.config.topk)

    def postprocess(self, batch: Batch, logits: torch.Tensor | None) -> list[str | RequestError]:
        """Fill in each decoded request's JSON top-k answer; errors stay as they are."""
        results = list(batch.results)
        if logits is not None:
            predictions = topk_predictions(torch.softmax(logits.float(), dim=1), self.labels, self.config.topk)
            for idx, prediction in zip(batch.positions, predictions, strict=True):
                results[idx] = json.dumps(prediction)
        return results

    def process(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str]) -> list[str | RequestError]:
        """A batch of requests -> per request, a JSON string of predictions or a RequestError."""
        batch = self.preprocess(requests, content_types)
        return self.postprocess(batch, self.run(batch))
