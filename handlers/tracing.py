"""OpenTelemetry traces of each request through a worker, exported over OTLP (HTTP, protobuf): off unless the
server's environment names a collector, as OpenTelemetry's own variables do (`OTEL_EXPORTER_OTLP_ENDPOINT`, or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; TorchServe hands its environment to every worker). With it set, each request
of a batch gets, under the span its W3C `traceparent` header names (the frontend's, org.servemodels.oip.RequestTraces,
which rewrote the header; nothing when it says the trace is not sampled):

    <model> request      from the frontend's arrival time (X-Received-Ms) to its answer; model, version,
                         request ID (X-Request-ID), status, cache status
      queue              arrival to the worker taking its batch (TorchServe's own queue and batch aggregation)
      preprocess         the batch's decoding and preset          \
      inference          the batch's forward pass, `batch.size`    } a computed request's; one batch, shared
      postprocess        the batch's answers                      /

A generator's request (continuous batching, handlers.kinds.generate) has its own layout: `record_generation`.
A request answered without being computed (its deadline passed in the queue, or the response cache held it) has
its request span and queue span alone; one refused has preprocess too. Spans leave on a background thread in
batches (BatchSpanProcessor): a collector that is down costs the exporter's retries, never an answer. The other
OTEL_* variables (service name, sampler, batch delay, headers) are the SDK's own.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

from handlers.batch_metrics import STAGES, StageClock
from handlers.requests import RECEIVED_HEADER, RequestError, header

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C Trace Context


def enabled(environment: Mapping[str, str] = os.environ) -> bool:
    return any(environment.get(name) for name in ENDPOINT_VARIABLES)


class Tracing:
    """A worker's tracer and its exporter (`Tracing.start()`: None when tracing is off)."""

    def __init__(self, provider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider, self.tracer, self.trace = provider, provider.get_tracer("servemodels.handlers"), trace
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def start(cls, environment: Mapping[str, str] = os.environ) -> "Tracing | None":
        if not enabled(environment):
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": environment.get("OTEL_SERVICE_NAME") or "torchserve-worker"})
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER (default: parent-based)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def record(self, served_as: tuple[str, str], headers: Sequence[Mapping[str, Any] | None], ids: Sequence[str],
               outcome: Sequence[Any], computed: Sequence[int], clock: StageClock,
               cached: Sequence[str | None] = ()) -> None:
        """The spans of one batch's requests, once they are answered: `outcome` each request's answer, `computed`
        the indexes of those the model ran on (in one batch of that size)."""
        model, version = served_as
        now = time.time_ns()
        ran = set(computed)
        for idx, (request_headers, request_id, answer) in enumerate(zip(headers, ids, outcome, strict=True)):
            status = answer.status if isinstance(answer, RequestError) else 200
            attributes = {"model.name": model, "model.version": version, "request.id": request_id}
            if cached and cached[idx] is not None:
                attributes["cache.status"] = cached[idx]
            root, inside = self._request(model, request_headers, clock.taken_ns, status, attributes)
            if idx in ran:  # a refused one was read, and went no further
                for stage in STAGES if status == 200 else STAGES[:1]:
                    if stage in clock.spans:
                        extra = {"batch.size": len(computed)} if stage == "inference" else None
                        self._span(stage, inside, *clock.spans[stage], extra)
            root.end(end_time=now)

    def record_generation(self, served_as: tuple[str, str], timelines: Sequence[Any]) -> None:
        """The spans of a generator's requests answered in full (handlers.kinds.generate.Timeline each): the request
        from the frontend's arrival to its last chunk, its queue (to the scheduler reading it), preprocess (read:
        decoded, templated, tokenized), inference (its prefill, with the prompts prefilled together as batch.size)
        and decode (first to last decode step, with the most sequences stepped together)."""
        model, version = served_as
        for timeline in timelines:
            attributes = {"model.name": model, "model.version": version, "request.id": timeline.request_id,
                          "gen_ai.usage.input_tokens": timeline.prompt_tokens,
                          "gen_ai.usage.output_tokens": timeline.generated_tokens}
            root, inside = self._request(model, timeline.headers, timeline.read[0], timeline.status, attributes)
            self._span("preprocess", inside, *timeline.read)
            if timeline.prefill is not None:
                self._span("inference", inside, *timeline.prefill, {"batch.size": timeline.prefill_batch})
            if timeline.decode is not None:
                self._span("decode", inside, *timeline.decode, {"batch.size": timeline.decode_batch})
            root.end(end_time=max(timeline.ended, timeline.read[1]))

    def _request(self, model: str, request_headers: Mapping[str, Any] | None, taken_ns: int, status: int,
                 attributes: dict[str, Any]):
        """A request's span, opened under the span its `traceparent` names (the frontend's) from the frontend's
        arrival stamp (X-Received-Ms; never after `taken_ns`, when the worker took the request), with its status and
        `attributes`, and its queue span (arrival to `taken_ns`): (the span, the context of spans inside it). The
        caller ends it."""
        carrier = {name: value for name in TRACE_HEADERS if (value := header(request_headers, name)) is not None}
        received = header(request_headers, RECEIVED_HEADER)
        arrived = int(received) * 1_000_000 if received is not None and received.isdigit() else taken_ns
        arrived = min(arrived, taken_ns)
        # INTERNAL: the frontend's span (org.servemodels.oip.RequestTraces), its parent, is the server's
        root = self.tracer.start_span(f"{model} request", context=self.propagator.extract(carrier),
                                      kind=self.trace.SpanKind.INTERNAL, start_time=arrived,
                                      attributes={**attributes, "http.response.status_code": status})
        if status >= 500:
            root.set_status(self.trace.Status(self.trace.StatusCode.ERROR, str(status)))
        inside = self.trace.set_span_in_context(root)
        self._span("queue", inside, arrived, taken_ns)
        return root, inside

    def _span(self, name: str, context, start: int, end: int, attributes: dict | None = None) -> None:
        self.tracer.start_span(name, context=context, start_time=start, attributes=attributes).end(end_time=end)
