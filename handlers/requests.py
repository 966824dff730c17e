"""What the image and text pipelines share about requests. Nothing here knows about TorchServe.

- `RequestError`: one request's problem, with its HTTP status and JSON body;
- `per_request`: runs one request's step so that a bug costs that request a 500, never its batch;
- parsing helpers: a header mapping's media type, a JSON body, UTF-8 bytes;
- `Pipeline`: the three stages every pipeline has (preprocess, run, postprocess), and `process` for all three.
"""

from __future__ import annotations

import http
import json
import logging
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

logger = logging.getLogger(__name__)


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


def content_type_of(headers: Mapping[str, Any] | None) -> str:
    """The media type (no parameters, lower case) from a header mapping, or ''."""
    for key, value in (headers or {}).items():
        if key.lower() == "content-type" and isinstance(value, str):
            return value.split(";", 1)[0].strip().lower()
    return ""


def parse_json_body(text: str) -> Any:
    """A JSON body's value; RequestError 400 InvalidJSON when it does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError(400, "InvalidJSON", f"the body is not valid JSON: {err}") from None


def decode_utf8(data: bytes) -> str:
    """Bytes as UTF-8 text; RequestError 400 InvalidUTF8 naming the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, "InvalidUTF8", f"the body is not valid UTF-8 (byte {err.start})") from None


BatchT = TypeVar("BatchT")
OutputT = TypeVar("OutputT")


class Pipeline(Generic[BatchT, OutputT]):
    """A batch of requests in, one answer per request out (a JSON string or a RequestError), in three stages
    the adapter times separately: `preprocess` (parse and decode; bad requests are answered here), `run` (the
    forward passes) and `postprocess` (one answer per request)."""

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str]) -> BatchT:
        raise NotImplementedError

    def run(self, batch: BatchT) -> OutputT:
        raise NotImplementedError

    def postprocess(self, batch: BatchT, outputs: OutputT) -> list[str | RequestError]:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run once on stand-in input, so the first real requests pay no one-off costs."""

    def process(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str]) -> list[str | RequestError]:
        """All three stages in order."""
        batch = self.preprocess(requests, content_types)
        return self.postprocess(batch, self.run(batch))
