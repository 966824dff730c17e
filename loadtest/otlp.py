"""A trace receiver that speaks OTLP over HTTP (`POST /v1/traces`, in OTLP's protobuf form, read with
OpenTelemetry's own `opentelemetry-proto` messages, as the workers send it, or its JSON form, as the frontend's
RequestTraces sends it), on a free loopback port: what the tracing tests and `make trace-bench` point the server at
(handlers/tracing.py). It keeps every span it is sent, flattened.

    with Receiver() as receiver:
        ... OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint ...
        receiver.wait_for(lambda spans: ..., timeout=30)
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


PROTOBUF, JSON = "application/x-protobuf", "application/json"


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str  # "" for a root
    start_ns: int
    end_ns: int
    kind: int  # OTLP's SpanKind number (2: SERVER)
    service: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status: int = 0  # OTLP's StatusCode number (2: ERROR)


def _value(any_value) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def parse(body: bytes, content_type: str = PROTOBUF) -> list[Span]:
    """The spans of one OTLP/HTTP export request, protobuf or JSON (OTLP's JSON mapping: ids in hex)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    if content_type == JSON:
        data = json.loads(body)
        for resource_spans in data.get("resourceSpans", []):  # hex ids, where protobuf's JSON mapping has base64
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    for key in ("traceId", "spanId", "parentSpanId"):
                        span[key] = base64.b64encode(bytes.fromhex(span.get(key, ""))).decode()
        json_format.ParseDict(data, request)
    else:
        request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                spans.append(Span(s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                  s.start_time_unix_nano, s.end_time_unix_nano, s.kind,
                                  str(resource.get("service.name", "")),
                                  {a.key: _value(a.value) for a in s.attributes}, s.status.code))
    return spans


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # a collector's backlog: the frontend's and every worker's exporters may connect at once


class Receiver:
    """The receiver, serving on 127.0.0.1 from a thread until closed; `endpoint` is what
    OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self, *, strict: bool = True) -> None:
        """`strict`: parse each export as it arrives, to refuse one that does not parse (400); without it the
        bodies are kept and parsed when the spans are asked for (a bench's receiver, sharing the server's cores)."""
        self.strict = strict
        self.spans: list[Span] = []
        self._raw: list[tuple[bytes, str]] = []
        self.exports = 0
        self.refusing: dict[str, set[str]] = {}  # trace ID -> media types whose first export of it is refused
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if self.path != "/v1/traces" or content_type not in (PROTOBUF, JSON):
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                if receiver.strict:  # a body that is no export request is refused; its spans are read when asked for
                    try:
                        spans = parse(body, content_type)
                    except Exception:  # noqa: BLE001
                        self.send_error(400)
                        return
                    with receiver._lock:  # the first export of a trace `refuse` named, from each exporter's form
                        refused = [t for t in {s.trace_id for s in spans} if content_type in receiver.refusing.get(t, ())]
                        for trace_id in refused:
                            receiver.refusing[trace_id].discard(content_type)
                    if refused:
                        self.send_error(503)
                        return
                with receiver._lock:
                    receiver._raw.append((body, content_type))
                    receiver.exports += 1
                answer = b"{}" if content_type == JSON else b""  # an empty ExportTraceServiceResponse: all accepted
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def refuse(self, trace_id: str) -> None:
        """Answer 503 Service Unavailable (OTLP's retryable answer: a collector briefly unavailable) to the first
        export holding a span of `trace_id` in each form (protobuf: the workers' SDK; JSON: the frontend's exporter);
        strict receivers only."""
        with self._lock:
            self.refusing[trace_id] = {PROTOBUF, JSON}

    def snapshot(self) -> list[Span]:
        with self._lock:
            raw, self._raw = self._raw, []
            for body, content_type in raw:
                self.spans.extend(parse(body, content_type))
            return list(self.spans)

    def wait_for(self, done: Callable[[list[Span]], bool], timeout: float = 30.0) -> list[Span]:
        """The spans received, once `done(spans)` holds; AssertionError naming what came after `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.snapshot()
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"spans received in {timeout} s do not suffice: "
                                     f"{sorted({(s.name, s.trace_id[:8]) for s in spans})[:40]}")
            time.sleep(0.1)
