"""What every image kind shares: reading an image request in each of its forms, decoding it within the
request's and the batch's pixel budgets, and the batched pipeline a kind subclasses. Pure request and batch
functions; nothing here knows about TorchServe.

One request in, one answer out: `ImagePipeline.process` takes a batch of requests and returns, per request,
either a JSON string or a `RequestError` that carries its own HTTP status and JSON body. A bad request never fails
its neighbours. `ImagePipeline` reads and decodes the requests and runs the batch; each image kind says what its
rows' outputs mean (`answers`), how one row is answered natively (`native`) and how rows are answered over OIP
(`infer_outputs`): the classifier in handlers/kinds/classify.py, the detector in handlers/kinds/detect.py, the
segmenter in handlers/kinds/segment.py.

Accepted request forms (per request):
- the raw image bytes as the body (`curl --data-binary @digit.png`; over gRPC, the one input's bytes);
- a multipart/form-data upload (`curl -F data=@digit.png`; the part named data, file or image, else
  the first file part);
- JSON `{"image": "<base64>"}` (a `data:image/...;base64,` prefix is accepted);
- an Open Inference Protocol infer request (handlers.oip) with one input of several rows: BYTES `[n]`
  (encoded images, base64 in JSON, raw in the binary extension), UINT8 `[n, h, w, c]` pixels (c = 1, 3
  or 4, any size: the preset resizes) or FP32 in the model's own input layout (already preprocessed).
Every row of every request of a batch goes through the model together, in passes of at most
`max_rows_per_pass` rows (the largest verified batch).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from handlers import oip
from handlers.requests import Pipeline, RequestError, json_value, parse_json_body, per_request, request_body
from handlers.settings import HandlerSettings
from models.preprocessing import ImageTooLarge, InvalidImage, decode_for, shown_size

PREFERRED_PARTS = ("data", "file", "image")
PIXEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of a UINT8 [n, h, w, c] input -> PIL mode


@dataclass(frozen=True)
class ImageConfig(HandlerSettings):
    """What every image kind reads from the `handler:` section of its model-config YAML: the limits on images."""

    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024
    min_image_side: int = 8  # smaller images carry no usable content (and sklearn's digits are 8x8)
    max_aspect_ratio: int = 20  # long side / short side; a 10000x1 strip is no photo of anything
    preprocess_threads: int = 1  # decode a batch's images on this many threads (Pillow and NumPy release the GIL)
    max_rows_per_request: int = 64  # images in one OIP request
    max_rows_per_pass: int = 64  # rows in one forward pass: at most the largest verified batch
    # Decoding costs in proportion to decoded pixels (about 55 ns each here, a 58 KB PNG of 4096x4096 takes 0.9 s),
    # and an image's bytes say little of its pixels: the pixels a request, and a whole batch, may decode.
    max_pixels_per_request: int = 16 * 1024 * 1024
    max_pixels_per_batch: int = 64 * 1024 * 1024

    @property
    def rows_per_pass(self) -> int:
        return self.max_rows_per_pass


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
            return _from_json(parse_json_body(value))
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


class DecodeBudget:
    """The pixels one batch may still decode, shared by its requests and the threads that decode them."""

    def __init__(self, per_batch: int) -> None:
        self.per_batch, self.left = per_batch, per_batch
        self._lock = threading.Lock()

    def for_request(self, per_request: int) -> Callable[[int], None]:
        """A charge for one request's images: 413 past `per_request` pixels in all, 503 once the batch's are spent
        (its neighbours in the batch keep theirs; the request is worth retrying). Called before each decode."""
        used = 0

        def charge(pixels: int) -> None:
            nonlocal used
            used += pixels
            if used > per_request:
                raise RequestError(413, "RequestTooLarge", f"the request's images hold more than {per_request} pixels "
                                   "in all (max_pixels_per_request); send fewer or smaller images per request")
            with self._lock:
                if pixels > self.left:
                    raise RequestError(503, "BatchBudgetSpent", f"the batch this request fell into has decoded its "
                                       f"{self.per_batch} pixels (max_pixels_per_batch); retry")
                self.left -= pixels

        return charge


def no_budget(pixels: int) -> None:
    """The charge of a caller that bounds nothing (tests of one image)."""


Size = tuple[int, int]  # (width, height) of an image as shown (EXIF orientation applied)


@dataclass
class Batch:
    """A batch after preprocessing: per request, an error already decided or its rows in `inputs`."""

    results: list  # per request: RequestError, or None until postprocess fills in the answer
    inputs: np.ndarray | None  # (rows, ...) of every decoded request in order; None when none decoded
    owners: list[int]  # the request each row belongs to
    sizes: list[Size]  # each row's image as shown, before the preset (what boxes and masks map back to)
    infer: list  # per request: its oip.InferRequest, or None for a native request (one row)
    options: list = field(default_factory=list)  # per row: its request's own knobs (the kind's `options`)


class ImagePipeline(Pipeline[Batch, "list[np.ndarray] | None"]):
    """preprocess (decode, collate) -> run (forward passes) -> postprocess (the kind's answers), one answer per
    request. A kind subclasses it with `OUTPUTS` (its OIP outputs, in order), `answers`, `native` and
    `infer_outputs`.

    `input_shape` (one row, batch axis left out) checks FP32 inputs and sizes the warm-up passes with
    `max_batch`; `served_as` (model name, version) names the model in OIP answers."""

    OUTPUTS: tuple[str, ...] = ()

    def __init__(self, runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]], preset: Callable,
                 labels: Sequence[str], config: ImageConfig, *, input_shape: Sequence[int] = (),
                 max_batch: int = 1, served_as: tuple[str, str] = ("model", "1")) -> None:
        self.runner, self.preset, self.labels, self.config = runner, preset, list(labels), config
        self.input_shape, self.max_batch, self.served_as = tuple(input_shape), max_batch, served_as
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="decode") \
            if config.preprocess_threads > 1 else None

    def image(self, data: bytes, charge: Callable[[int], None] = no_budget) -> tuple[np.ndarray, Size]:
        """Encoded image bytes -> the model's input row and the image's size as shown, or RequestError naming what
        is wrong with them; `charge` is told the pixels before they are decoded (DecodeBudget)."""
        if not data:
            raise RequestError(400, "EmptyRequest", "the image is empty (0 bytes)")
        if len(data) > self.config.max_image_bytes:
            raise RequestError(413, "PayloadTooLarge", f"the image is {len(data)} bytes; this model accepts at most "
                                                       f"{self.config.max_image_bytes}")
        try:
            image = decode_for(self.preset, data, max_pixels=self.config.max_image_pixels,
                               min_side=self.config.min_image_side, max_aspect=self.config.max_aspect_ratio,
                               allow_animated=False, charge=charge)
            return self.preset(image), shown_size(image)
        except ImageTooLarge as err:
            raise RequestError(413, "ImageTooLarge", str(err)) from None
        except InvalidImage as err:
            raise RequestError(400, "InvalidImage", str(err)) from None

    def pixels(self, array: np.ndarray, charge: Callable[[int], None] = no_budget) -> tuple[np.ndarray, Size]:
        """(h, w, c) uint8 pixels -> the model's input row and (w, h), under the same size limits as encoded images."""
        height, width, channels = array.shape
        if height * width > self.config.max_image_pixels:
            raise RequestError(413, "ImageTooLarge", f"the image is {width}x{height} = {width * height} pixels; this "
                                                     f"model accepts at most {self.config.max_image_pixels}")
        if min(height, width) < self.config.min_image_side:
            raise RequestError(400, "InvalidImage", f"the image is {width}x{height}; this model needs at least "
                                                    f"{self.config.min_image_side} pixels a side")
        if max(height, width) > self.config.max_aspect_ratio * min(height, width):
            raise RequestError(400, "InvalidImage", f"the image is {width}x{height}, an aspect ratio over "
                                                    f"{self.config.max_aspect_ratio}:1")
        charge(height * width)
        plane = array[:, :, 0] if channels == 1 else array
        return self.preset(Image.fromarray(np.ascontiguousarray(plane), mode=PIXEL_MODES[channels])), (width, height)

    def infer_rows(self, request: oip.InferRequest, charge: Callable[[int], None] = no_budget
                   ) -> tuple[np.ndarray, list[Size]]:
        """An OIP request's rows, (n, *input_shape), and their sizes as shown, from its one input in any of the three
        accepted forms (FP32 rows are the model's own input: their size is the input's)."""
        request.check_outputs(self.OUTPUTS)
        tensor = request.only_input("image")
        shape, rows = tensor.shape, tensor.rows
        accepted = (f"send BYTES [n] (encoded images: base64 strings in JSON, raw bytes in the binary extension), "
                    f"UINT8 [n, h, w, c] pixels with c = 1, 3 or 4, or FP32 {[None, *self.input_shape]} "
                    "(the model's own input, already preprocessed)")
        if not 1 <= rows:
            raise oip.invalid(f"input {tensor.name!r} has no rows (shape {list(shape)})")
        if rows > self.config.max_rows_per_request:
            raise oip.invalid(f"input {tensor.name!r} has {rows} rows; at most {self.config.max_rows_per_request} "
                              "per request", status=413)
        if tensor.datatype == "BYTES" and shape in ((rows,), (rows, 1)):
            return _stack([self._row(i, self.image, _encoded(value, i), charge) for i, value in enumerate(tensor.data)])
        if tensor.datatype == "UINT8" and len(shape) == 4 and shape[3] in PIXEL_MODES:
            return _stack([self._row(i, self.pixels, tensor.data[i], charge) for i in range(rows)])
        if tensor.datatype == "FP32" and shape[1:] == self.input_shape:
            if not np.isfinite(tensor.data).all():
                raise oip.invalid(f"input {tensor.name!r} holds NaN or infinite values")
            size = (self.input_shape[-1], self.input_shape[-2]) if len(self.input_shape) >= 2 else (1, 1)
            return np.ascontiguousarray(tensor.data, dtype=np.float32), [size] * rows
        raise oip.invalid(f"input {tensor.name!r} is {tensor.datatype} {list(shape)}; {accepted}")

    @staticmethod
    def _row(index: int, convert: Callable[..., tuple[np.ndarray, Size]], value: Any, charge: Callable[[int], None]
             ) -> tuple[np.ndarray, Size]:
        try:
            return convert(value, charge)
        except RequestError as err:
            raise RequestError(err.status, err.kind, f"row {index}: {err.message}") from None

    def options(self, request: Mapping[str, Any], infer: oip.InferRequest | None) -> Any:
        """A request's own settings of the kind's knobs, bounded by the model's config (OIP `parameters`, or a
        native request's query parameters), or RequestError; None for a kind without knobs."""
        return None

    def _decode_with_options(self, request: Mapping[str, Any], content_type: str, header_length: int | None,
                             charge: Callable[[int], None]
                             ) -> tuple[np.ndarray, list[Size], oip.InferRequest | None, Any]:
        rows, sizes, infer = self.decode(request, content_type, header_length, charge)
        try:
            return rows, sizes, infer, self.options(request, infer)
        except RequestError as err:
            raise (err.as_oip() if infer is not None else err) from None

    def decode(self, request: Mapping[str, Any], content_type: str = "", header_length: int | None = None,
               charge: Callable[[int], None] = no_budget
               ) -> tuple[np.ndarray, list[Size], oip.InferRequest | None]:
        """One request -> its rows, their sizes as shown and, for an OIP request, the parsed request; or
        RequestError. `charge` is its share of the batch's DecodeBudget."""
        if header_length is not None:  # the binary tensor extension: raw bytes, JSON header first
            body = request_body(request, content_type)
            infer = oip.parse_binary(bytes(body) if isinstance(body, (bytes, bytearray)) else b"", header_length)
            return *self._as_oip(self.infer_rows, infer, charge), infer
        value = json_value(request, content_type)
        if oip.is_infer_request(value):
            infer = self._as_oip(oip.parse, value)
            return *self._as_oip(self.infer_rows, infer, charge), infer
        if value is not None and not content_type:  # JSON with no media type: a gRPC call
            row, size = self.image(_from_json(value), charge)
        else:
            row, size = self.image(extract_image_bytes(request, content_type, max_bytes=self.config.max_image_bytes),
                                   charge)
        return row[None], [size], None

    @staticmethod
    def _as_oip(action: Callable[..., Any], *args: Any) -> Any:
        try:
            return action(*args)
        except RequestError as err:
            raise err.as_oip() from None

    def _decode_or_error(self, idx: int, request: Mapping[str, Any], content_type: str, header_length: int | None,
                         budget: DecodeBudget):
        charge = budget.for_request(self.config.max_pixels_per_request)
        return per_request(idx, "decoding", self._decode_with_options, request, content_type, header_length, charge)

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                   header_lengths: Sequence[int | None] | None = None) -> Batch:
        """Decode every request (on `preprocess_threads` threads) within the batch's DecodeBudget; a bad one gets its
        RequestError and leaves the batch."""
        lengths = list(header_lengths) if header_lengths is not None else [None] * len(requests)
        budget = DecodeBudget(self.config.max_pixels_per_batch)
        jobs = list(zip(range(len(requests)), requests, content_types, lengths, [budget] * len(requests), strict=True))
        if self._pool is not None and len(jobs) > 1:
            decoded = list(self._pool.map(lambda job: self._decode_or_error(*job), jobs))
        else:
            decoded = [self._decode_or_error(*job) for job in jobs]
        results: list = [d if isinstance(d, RequestError) else None for d in decoded]
        infer = [None if isinstance(d, RequestError) else d[2] for d in decoded]
        good = [(i, d[0], d[1]) for i, d in enumerate(decoded) if not isinstance(d, RequestError)]
        owners = [i for i, rows, _ in good for _ in range(rows.shape[0])]
        sizes = [size for _, _, row_sizes in good for size in row_sizes]
        options = [decoded[i][3] for i in owners]
        return Batch(results, np.concatenate([rows for _, rows, _ in good]) if good else None, owners, sizes, infer,
                     options)

    def run(self, batch: Batch) -> list[np.ndarray] | None:
        """The batch's forward passes, `max_rows_per_pass` rows at a time: (rows, C, H, W) -> each of the model's
        outputs for every row, on the CPU (None when no request of the batch decoded)."""
        if batch.inputs is None:
            return None
        step = self.config.max_rows_per_pass
        passes = [self.runner([batch.inputs[i:i + step]]) for i in range(0, batch.inputs.shape[0], step)]
        return [np.concatenate(parts) for parts in zip(*passes, strict=True)]

    def warm_up(self) -> None:
        """The smallest and the largest batch, once each."""
        for size in sorted({1, self.max_batch}):
            self.runner([np.zeros((size, *self.input_shape), dtype=np.float32)])

    def postprocess(self, batch: Batch, outputs: list[np.ndarray] | None
                    ) -> list[str | oip.BinaryAnswer | RequestError]:
        """Fill in each decoded request's JSON answer (native, or an OIP response); errors stay as they are."""
        results = list(batch.results)
        if outputs is None:
            return results
        rows_of: dict[int, list[Any]] = {}
        for owner, answer in zip(batch.owners, self.answers(outputs, batch.sizes, batch.options), strict=True):
            rows_of.setdefault(owner, []).append(answer)
        for idx, rows in rows_of.items():
            request = batch.infer[idx]
            results[idx] = self.native(rows[0]) if request is None else \
                oip.response(*self.served_as, request, self.infer_outputs(rows))
        return results

    def answers(self, outputs: list[np.ndarray], sizes: list[Size], options: Sequence[Any] = ()) -> list[Any]:
        """The model's outputs for every row of a batch -> each row's answer (the kind's own structure); `options`:
        each row's request's knobs (empty: the model's config for every row)."""
        raise NotImplementedError

    def native(self, answer: Any) -> str:
        """A native request's answer (its one row), as the JSON the route returns."""
        return json.dumps(answer)

    def infer_outputs(self, rows: list[Any]) -> list[oip.Tensor]:
        """An OIP request's rows' answers -> its output tensors, in `OUTPUTS` order."""
        raise NotImplementedError


def _stack(rows: list[tuple[np.ndarray, Size]]) -> tuple[np.ndarray, list[Size]]:
    return np.stack([row for row, _ in rows]), [size for _, size in rows]


def _encoded(value: str | bytes, index: int) -> bytes:
    """A BYTES element holding an encoded image: raw bytes (binary extension) or a base64 string (JSON)."""
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "InvalidBase64", f"row {index} is not valid base64") from None


def input_signature(export_manifest: dict) -> list[dict]:
    """Every image kind's one input as OIP model metadata lists it. The input also takes UINT8 [n, h, w, c] pixels
    or FP32 in the model's layout (docs/protocols.md); metadata names one datatype per input, the encoded image."""
    return [{"name": export_manifest["inputs"][0]["name"], "datatype": "BYTES", "shape": [-1]}]


def build(pipeline: type[ImagePipeline], export_manifest: dict,
          runner: Callable[[Sequence[np.ndarray]], list[np.ndarray]], settings: ImageConfig, *,
          served_as: tuple[str, str], max_batch: int) -> ImagePipeline:
    """An image kind's `pipeline` for an exported model: its preprocessing preset, labels and input shape come from
    the export manifest."""
    from models.preprocessing import build_preset

    return pipeline(runner, build_preset(export_manifest["preset"]), export_manifest["labels"], settings,
                    input_shape=export_manifest["inputs"][0]["example_shape"][1:], max_batch=max_batch,
                    served_as=served_as)
