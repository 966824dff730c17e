"""Real request payloads for a registered model, shared by `make predict`, Locust, the bench and the tests.

A payload is sent in one of several forms (`FORMS`): the native one (`POST /predictions/<model>` with the
file's bytes and media type), or an Open Inference Protocol infer request (`POST /v2/models/<model>/infer`)
carrying the same input as one BYTES row (`oip-bytes`: the encoded image in base64, or the text), or, for an
image, its decoded pixels as a UINT8 `[1, h, w, 3]` tensor in the binary tensor extension, every output asked for
in that extension too, as Triton's client asks (`oip-pixels`), or, for
a payload that already is an infer request (a tensor-kind model's), the same body at the infer route (`oip-json`).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from dataclasses import dataclass, field

from models import registry

NATIVE = "/predictions/{endpoint}"
INFER = "/v2/models/{endpoint}/infer"
FORMS = ("native", "oip-bytes", "oip-pixels", "oip-json")


@dataclass(frozen=True)
class Payload:
    body: bytes
    content_type: str
    label: int
    name: str
    path: str = NATIVE  # formatted with the endpoint (the served model's name)
    headers: dict = field(default_factory=dict)


def _text(payload: Payload) -> str:
    if payload.content_type == "application/json":
        return json.loads(payload.body)["text"]
    return payload.body.decode("utf-8")


def as_form(payload: Payload, form: str) -> Payload:
    """The same input in another form (FORMS); ValueError for a form the payload cannot take (pixels of a text)."""
    if form == "native":
        return payload
    image = payload.content_type.startswith("image/")
    if form == "oip-json" and payload.content_type == "application/json" and "inputs" in json.loads(payload.body):
        return Payload(payload.body, payload.content_type, payload.label, payload.name, INFER)
    if form == "oip-bytes":
        row = base64.b64encode(payload.body).decode() if image else _text(payload)
        body = {"inputs": [{"name": "image" if image else "text", "shape": [1], "datatype": "BYTES", "data": [row]}]}
        return Payload(json.dumps(body).encode(), "application/json", payload.label, payload.name, INFER)
    if form == "oip-pixels" and image:
        import numpy as np
        from PIL import Image, ImageOps

        pixels = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(payload.body))).convert("RGB"), dtype=np.uint8)
        header = json.dumps({"inputs": [{"name": "image", "shape": [1, *pixels.shape], "datatype": "UINT8",
                                         "parameters": {"binary_data_size": pixels.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        return Payload(header + pixels.tobytes(), "application/octet-stream", payload.label, payload.name, INFER,
                       {"Inference-Header-Content-Length": str(len(header))})
    raise ValueError(f"{payload.name} ({payload.content_type}) cannot be sent as {form}; forms: {FORMS}")


def payloads(model: str, count: int, form: str = "native") -> list[Payload]:
    """`count` real inputs for `model` from its registry `samples` function, each with its media type, in `form`."""
    spec = registry.get(model)
    if spec.samples is None:
        raise SystemExit(f"{model}: the registry entry names no `samples` function to build request payloads from")
    return [
        as_form(Payload(body, mimetypes.guess_type(name)[0] or "application/octet-stream", label, name), form)
        for body, label, name in registry.resolve(spec.samples)(count)
    ]
