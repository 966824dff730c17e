"""What the image and text pipelines share about requests. Nothing here knows about TorchServe.

- `RequestError`: one request's problem, with its HTTP status and JSON body;
- `per_request`: runs one request's step so that a bug costs that request a 500, never its batch;
- parsing helpers: a header, a header mapping's media type, a prediction's query fields, a JSON body, UTF-8
  bytes;
- `expired`: a request whose deadline passed while it queued, or will pass before it can be answered, gets its 504
  before anything is computed;
- `Pipeline`: the three stages every pipeline has (preprocess, run, postprocess), `process` for all three, and
  `isolate`, which answers a batch whose forward pass failed one request at a time.
"""

from __future__ import annotations

import http
import json
import logging
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    from handlers.oip import BinaryAnswer

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A problem with one request: an HTTP status, a short type name and a message for the client. Its body
    is this project's `{"code", "type", "message"}`, or `{"error": message}` for a request that came in the
    Open Inference Protocol (`oip`), which is how that protocol reports errors."""

    def __init__(self, status: int, kind: str, message: str, *, oip: bool = False) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.oip = status, kind, message, oip

    @property
    def phrase(self) -> str:
        return http.HTTPStatus(self.status).phrase

    def as_oip(self) -> "RequestError":
        """The same error, answered in the Open Inference Protocol's form."""
        return RequestError(self.status, self.kind, self.message, oip=True)

    def body(self) -> str:
        if self.oip:
            return json.dumps({"error": self.message})
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


def header(headers: Mapping[str, Any] | None, name: str) -> str | None:
    """A header's text from a header mapping, whatever the case of its name (`name` in lower case), or None."""
    for key, value in (headers or {}).items():
        if key.lower() == name and isinstance(value, str):
            return value
    return None


def content_type_of(headers: Mapping[str, Any] | None) -> str:
    """The media type (no parameters, lower case) from a header mapping, or ''."""
    value = header(headers, "content-type")
    return value.split(";", 1)[0].strip().lower() if value is not None else ""


REQUEST_ID_HEADER = "x-request-id"  # the request's ID: the client's when valid, else the frontend's (RequestIds)
QUERY_HEADER = "x-query-parameters"  # a prediction's raw query string (the frontend's RequestFacts sets it)
RECEIVED_HEADER = "x-received-ms"  # when the frontend had the whole request, ms since the epoch (RequestFacts)
TIMEOUT_HEADER = "x-request-timeout-ms"  # the client's: how long, from its arrival, an answer is worth waiting for
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_QUERY_FIELDS = 16


def request_id(headers: Mapping[str, Any] | None, job_id: str | None) -> str:
    """A request's ID: its X-Request-ID, which the frontend sets on every HTTP request and gRPC call (the client's when
    valid, org.servemodels.oip.RequestIds), else the ID of TorchServe's job, else "-"."""
    return header(headers, REQUEST_ID_HEADER) or job_id or "-"


def with_query(requests: list, headers: list) -> list:
    """The requests, each with its query parameters as request fields (text) beside its body, as TorchServe gives
    them on its legacy routes: the first value of each name, at most MAX_QUERY_FIELDS names; a name the request
    already has, and `body` and `data`, are left to the body."""
    from urllib.parse import parse_qsl

    tagged = []
    for request, request_headers in zip(requests, headers, strict=True):
        query = header(request_headers, QUERY_HEADER)
        if not query:
            tagged.append(request)
            continue
        fields: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True, max_num_fields=None)[:4 * MAX_QUERY_FIELDS]:
            if len(fields) < MAX_QUERY_FIELDS and name not in fields and name not in ("body", "data"):
                fields[name] = value
        tagged.append({**fields, **(request or {})})
    return tagged


def _oip_parameters(request: Mapping[str, Any] | None, header_length: int | None) -> Mapping[str, Any] | None:
    """An OIP infer request's `parameters`, read without decoding its tensors: TorchServe has parsed a JSON body
    sent as application/json; the binary extension's JSON header, and a JSON body sent with no media type (Triton's
    client sends none), are parsed here only when their bytes name a timeout (else the binary request's are {}: only
    a timeout is read here). None for any other request, or one that does not parse (the pipeline answers that)."""
    body = (request or {}).get("body")
    if isinstance(body, dict):
        value = body if "inputs" in body else None
    elif not isinstance(body, (bytes, bytearray)):
        return None
    elif header_length is not None:
        if not 0 < header_length <= 1 << 16:
            return None
        head = bytes(body[:header_length])
        if b'"timeout"' not in head:
            return {}  # the pipeline parses the header once; here it matters only when it names a timeout
        try:
            value = json.loads(head)
        except (ValueError, RecursionError):
            return None
    elif b'"timeout"' in body and looks_like_json(body):
        try:
            value = json.loads(bytes(body))
        except (ValueError, RecursionError):
            return None
        value = value if isinstance(value, dict) and "inputs" in value else None
    else:
        return None
    parameters = value.get("parameters") if isinstance(value, dict) else None
    return parameters if isinstance(parameters, dict) else {} if isinstance(value, dict) else None


def expired(headers: Mapping[str, Any] | None, now_ms: float, request: Mapping[str, Any] | None = None,
            header_length: int | None = None, service_ms: float = 0.0) -> RequestError | None:
    """A request's answer when it carries a deadline that has passed by `now_ms`, counted from its arrival at the
    frontend, or that will have passed before it can be answered (`service_ms`: what a batch takes now, the
    caller's estimate): 504, and it is not computed, since its client would not take its answer. The deadline is
    X-Request-Timeout-Ms (milliseconds), or else an OIP request's `parameters.timeout` (microseconds, as Triton's
    clients send it). 400 for a value that is not a whole number in [1 ms, a day]; None otherwise (no deadline, or
    time enough). An OIP request's errors are in OIP's form."""
    parameters = _oip_parameters(request, header_length)
    oip = parameters is not None
    if (timeout := header(headers, TIMEOUT_HEADER)) is not None:
        where, scale = "X-Request-Timeout-Ms", 1.0
        valid = timeout.strip().isdigit() and 1 <= int(timeout) <= MAX_TIMEOUT_MS
    elif oip and "timeout" in parameters:
        timeout, where, scale = parameters["timeout"], "parameters.timeout (microseconds)", 1000.0
        valid = isinstance(timeout, int) and not isinstance(timeout, bool) and 1 <= timeout <= MAX_TIMEOUT_MS * 1000
    else:
        return None
    if not valid:
        return RequestError(400, "InvalidTimeout", f"{where} must be a whole number in [1 ms, "
                                                   f"{MAX_TIMEOUT_MS} ms], got {str(timeout)[:40]!r}", oip=oip)
    deadline_ms = int(timeout) / scale
    received = header(headers, RECEIVED_HEADER)
    if received is None or not received.isdigit():
        return None  # no arrival time from the frontend: the deadline cannot be judged here
    waited = now_ms - int(received)
    if waited + service_ms <= deadline_ms:
        return None
    if waited <= deadline_ms:
        return RequestError(504, "DeadlineExceeded", f"the request waited {waited:.0f} ms, and answering it takes about "
                                                     f"{service_ms:.0f} ms more, past its deadline of {deadline_ms:g} ms "
                                                     f"({where}); it was not computed", oip=oip)
    return RequestError(504, "DeadlineExceeded", f"the request waited {waited:.0f} ms, past its deadline of "
                                                 f"{deadline_ms:g} ms ({where}); it was not computed", oip=oip)


def parse_json_body(data: str | bytes | bytearray) -> Any:
    """A JSON body's value, from text or UTF-8 bytes; RequestError 400 InvalidJSON when it does not parse, for
    every way it can fail: bytes that are not UTF-8, text that is not JSON, nesting deeper than the parser
    recurses (RecursionError), or a number longer than Python converts (ValueError past 4,300 digits)."""
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(400, "InvalidJSON", f"the body is not valid JSON: not UTF-8 (byte {err.start})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise RequestError(400, "InvalidJSON", f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError(400, "InvalidJSON", "the body is not valid JSON here: it is nested too deeply") from None
    except ValueError as err:  # e.g. Python's limit on the digits of an integer
        raise RequestError(400, "InvalidJSON", f"the body is not valid JSON here: {err}") from None


def decode_utf8(data: bytes) -> str:
    """Bytes as UTF-8 text; RequestError 400 InvalidUTF8 naming the first bad byte otherwise."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(400, "InvalidUTF8", f"the body is not valid UTF-8 (byte {err.start})") from None


def request_body(request: Mapping[str, Any], content_type: str) -> Any:
    """A request's body as TorchServe hands it over: its "body" entry, or, for a request with no media type
    and one entry (a gRPC Predictions call's input map), that entry. None when there is none."""
    if "body" in request:
        return request["body"]
    if not content_type and len(request) == 1:
        return next(iter(request.values()))
    return None


def looks_like_json(value: Any) -> bool:
    """Whether bytes or text start (after blanks) with a JSON object's brace: how a request that came with
    no media type (gRPC) is told to be JSON."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value[:64]).lstrip().startswith(b"{")
    return isinstance(value, str) and value.lstrip().startswith("{")


def json_value(request: Mapping[str, Any], content_type: str) -> Any:
    """The request's JSON value, or None when it is not JSON: an application/json body (parsed by TorchServe
    or not; RequestError 400 when it does not parse), or a body with no media type whose bytes are a JSON
    object (a gRPC call; bytes that only look like JSON are left to the caller)."""
    body = request_body(request, content_type)
    if content_type == "application/json":
        # TorchServe's worker parses such a body first and forwards it as raw bytes when that fails.
        return parse_json_body(body) if isinstance(body, (str, bytes, bytearray)) else body
    if not content_type and looks_like_json(body):
        try:
            value = parse_json_body(body)
        except RequestError:
            return None
        return value if isinstance(value, dict) else None
    return None


BatchT = TypeVar("BatchT")
OutputT = TypeVar("OutputT")


class Pipeline(Generic[BatchT, OutputT]):
    """A batch of requests in, one answer per request out (a JSON string, an oip.BinaryAnswer or a RequestError), in
    three stages the adapter times separately: `preprocess` (parse and decode; bad requests are answered here), `run`
    (the forward passes) and `postprocess` (one answer per request)."""

    def preprocess(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                   header_lengths: Sequence[int | None] | None = None) -> BatchT:
        """`header_lengths`: each request's Inference-Header-Content-Length (OIP binary tensors), or None."""
        raise NotImplementedError

    def run(self, batch: BatchT) -> OutputT:
        raise NotImplementedError

    def postprocess(self, batch: BatchT, outputs: OutputT) -> list[str | BinaryAnswer | RequestError]:
        raise NotImplementedError

    def warm_up(self) -> None:
        """Run once on stand-in input, so the first real requests pay no one-off costs."""

    def refusal(self, batch: BatchT, error: RequestError) -> RequestError:
        """`error` in the form the one request of `batch` is answered in (a kind whose answers are all in the Open
        Inference Protocol's form says so here)."""
        return error

    def process(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                header_lengths: Sequence[int | None] | None = None) -> list[str | BinaryAnswer | RequestError]:
        """All three stages in order."""
        batch = self.preprocess(requests, content_types, header_lengths)
        return self.postprocess(batch, self.run(batch))

    def isolate(self, requests: Sequence[Mapping[str, Any]], content_types: Sequence[str],
                header_lengths: Sequence[int | None] | None = None) -> list[str | BinaryAnswer | RequestError]:
        """The answers of a batch whose forward pass raised: each request through all three stages alone, so only
        the ones that fail get an error. A request that fails alone gets 422 with the model's message, while the
        model still runs its stand-in input (warm_up); when that fails too the model is broken, not the request,
        and every failed request gets 500."""
        lengths = list(header_lengths) if header_lengths is not None else [None] * len(requests)
        answers: list[str | BinaryAnswer | RequestError] = []
        failed: list[tuple[int, Any, Exception]] = []
        for idx, (request, content_type, length) in enumerate(zip(requests, content_types, lengths, strict=True)):
            batch = self.preprocess([request], [content_type], [length])
            try:
                answers += self.postprocess(batch, self.run(batch))
            except Exception as err:  # noqa: BLE001 - judged below, once the model is known to work or not
                failed.append((idx, batch, err))
                answers.append(RequestError(500, "InternalError", "the request could not be processed"))
        if not failed:
            return answers
        try:
            self.warm_up()
            model_works = True
        except Exception:  # noqa: BLE001
            logger.exception("the model fails on its stand-in input too: it is broken, not the requests")
            model_works = False
        for idx, batch, err in failed:
            logger.warning("request %d of the batch fails alone: %s", idx, _first_line(err))
            if model_works:
                answers[idx] = self.refusal(batch, RequestError(
                    422, "ModelRejectedInput", f"the model cannot run this input: {_first_line(err)}"))
            else:
                answers[idx] = self.refusal(batch, answers[idx])
        return answers


def _first_line(err: Exception, limit: int = 300) -> str:
    """An exception's first line, bounded: what a client may read of a model's error."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]
