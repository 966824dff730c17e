"""The image-classifier pipeline: pure request and batch functions. Nothing here knows about TorchServe.

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
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from handlers.requests import Pipeline, RequestError, parse_json_body, per_request
from handlers.settings import HandlerSettings
from models.preprocessing import ImageTooLarge, InvalidImage, decode_for

PREFERRED_PARTS = ("data", "file", "image")


@dataclass(frozen=True)
class ClassifierConfig(HandlerSettings):
    """An image classifier's settings (the `handler:` section of its model-config YAML)."""

    topk: int = 5
    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024
    min_image_side: int = 8  # smaller images carry no usable content (and sklearn's digits are 8x8)
    max_aspect_ratio: int = 20  # long side / short side; a 10000x1 strip is no photo of anything
    preprocess_threads: int = 1  # decode a batch's images on this many threads (Pillow and torch release the GIL)


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


class ImageClassifier(Pipeline[Batch, "torch.Tensor | None"]):
    """preprocess (decode, collate) -> run (one forward pass) -> postprocess (top-k), one answer per request.

    `input_shape` (one row, batch axis left out) and `max_batch` size the warm-up passes."""

    def __init__(self, runner: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]], preset: Callable,
                 labels: Sequence[str], config: ClassifierConfig, *, input_shape: Sequence[int] = (),
                 max_batch: int = 1) -> None:
        self.runner, self.preset, self.labels, self.config = runner, preset, list(labels), config
        self.input_shape, self.max_batch = tuple(input_shape), max_batch
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
        """The batch's one forward pass: (B, C, H, W) -> (B, classes) logits on the CPU (None when no request
        of the batch decoded)."""
        return None if batch.inputs is None else self.runner([batch.inputs])[0]

    def warm_up(self) -> None:
        """The smallest and the largest batch, once each."""
        for size in sorted({1, self.max_batch}):
            self.runner([torch.zeros((size, *self.input_shape))])

    def postprocess(self, batch: Batch, logits: torch.Tensor | None) -> list[str | RequestError]:
        """Fill in each decoded request's JSON top-k answer; errors stay as they are."""
        results = list(batch.results)
        if logits is not None:
            predictions = topk_predictions(torch.softmax(logits.float(), dim=1), self.labels, self.config.topk)
            for idx, prediction in zip(batch.positions, predictions, strict=True):
                results[idx] = json.dumps(prediction)
        return results
