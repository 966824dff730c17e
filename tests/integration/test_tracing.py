"""Traces on a real TorchServe whose environment names a collector: each request joins the trace its W3C
`traceparent` names with the frontend's span (org.servemodels.oip.RequestTraces, OTLP's JSON form) and, under it,
the worker's (handlers/tracing.py, protobuf: the request from the frontend's arrival time, queue wait, preprocess,
inference with the batch size, postprocess), exported over OTLP/HTTP to a real receiver (loadtest/otlp.py) that
reads OpenTelemetry's wire format. A gRPC call has the worker's spans alone, under its traceparent metadata."""

from __future__ import annotations

import json
import secrets

import pytest
import requests

from loadtest.otlp import Receiver
from loadtest.payloads import payloads
from tests.conftest import CLASSIFIERS, EMBEDDERS, TREE, built, post_together

pytestmark = pytest.mark.integration

STAGES = ("queue", "preprocess", "inference", "postprocess")
GENERATOR = "chat-tiny"  # the generate kind, random weights


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(server, receiver): a classifier, an embedder and a generator served with tracing on, spans sent every
    100 ms."""
    from serve_config.control import Ports, start, stop

    models = [CLASSIFIERS[0].name, EMBEDDERS[0].name, GENERATOR]
    for model in models:
        built(TREE.archive(model))
    run_dir = tmp_path_factory.mktemp("traced")
    with Receiver() as receiver:
        try:
            yield start(run_dir, models, ports=Ports.free(), model_store=TREE.model_store,
                        extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
                                   "OTEL_SERVICE_NAME": "torchserve-test"}), receiver
        finally:
            stop(run_dir)


def parent() -> tuple[str, str, str]:
    """A client's (trace ID, span ID, traceparent) of a sampled trace."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def role(span) -> str:
    """"frontend" (the frontend's span, named by its method and path), "request" (the worker's), or the stage."""
    return "frontend" if span.name.startswith("POST /") else "request" if span.name.endswith(" request") else span.name


def trace_of(receiver: Receiver, trace_id: str, *, computed: bool = True) -> dict:
    """The spans of one request's trace by role, once all have arrived (a refused one: through preprocess)."""
    wanted = set(STAGES if computed else STAGES[:2]) | {"request", "frontend"}
    spans = receiver.wait_for(lambda got: wanted <= {role(s) for s in got if s.trace_id == trace_id})
    return {role(s): s for s in spans if s.trace_id == trace_id}


def test_a_request_joins_its_clients_trace_with_the_workers_spans_nested_in_time(traced):
    server, receiver = traced
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    trace_id, span_id, traceparent = parent()
    answer = requests.post(f"{server.inference_url}/predictions/{spec.name}", data=sample.body, timeout=60,
                           headers={**server.headers(), "Content-Type": sample.content_type, "traceparent": traceparent,
                                    "X-Request-ID": "traced-1"})
    assert answer.status_code == 200, answer.text
    spans = trace_of(receiver, trace_id)
    frontend, root = spans["frontend"], spans["request"]
    assert frontend.name == f"POST /predictions/{spec.name}" and frontend.parent_id == span_id and frontend.kind == 2
    assert frontend.attributes == {"request.id": "traced-1", "http.response.status_code": 200}
    assert root.name == f"{spec.name} request" and root.parent_id == frontend.span_id and root.kind == 1  # INTERNAL
    assert root.service == frontend.service == "torchserve-test"
    # the worker's request span begins at the frontend's arrival time, in whole milliseconds
    assert frontend.start_ns - 1_000_000 <= root.start_ns and root.end_ns <= frontend.end_ns
    assert root.attributes["request.id"] == "traced-1" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["model.name"] == spec.name and root.attributes["model.version"]
    for stage in STAGES:
        assert spans[stage].parent_id == root.span_id, stage
        assert root.start_ns <= spans[stage].start_ns <= spans[stage].end_ns <= root.end_ns, stage
    assert spans["queue"].start_ns == root.start_ns  # from the frontend's arrival
    order = [spans[stage] for stage in STAGES]
    assert all(a.end_ns <= b.start_ns for a, b in zip(order, order[1:])), [(s.name, s.start_ns, s.end_ns) for s in order]
    assert spans["inference"].attributes["batch.size"] >= 1


def test_a_collector_that_refuses_an_export_once_loses_no_span(traced):
    """The first export holding the request's spans is answered 503 by the collector, from the frontend's exporter
    and from the worker's: each tries again, and the whole trace arrives."""
    server, receiver = traced
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    trace_id, _, traceparent = parent()
    receiver.refuse(trace_id)
    answer = requests.post(f"{server.inference_url}/predictions/{spec.name}", data=sample.body, timeout=60,
                           headers={**server.headers(), "Content-Type": sample.content_type, "traceparent": traceparent})
    assert answer.status_code == 200, answer.text
    spans = trace_of(receiver, trace_id)
    assert spans["request"].parent_id == spans["frontend"].span_id
    assert receiver.refusing[trace_id] == set(), "an exporter never sent the trace, so nothing was refused"


def test_requests_that_share_a_batch_each_get_their_own_trace_with_the_batchs_size(traced):
    server, receiver = traced
    spec = EMBEDDERS[0]
    samples = payloads(spec.name, 12)
    parents = [parent() for _ in samples]
    answers = post_together(server, [(spec.name, s.body, {"Content-Type": s.content_type, "traceparent": p[2]})
                                     for s, p in zip(samples, parents)])
    assert [a.status_code for a in answers] == [200] * len(samples), [a.text for a in answers]
    traces = [trace_of(receiver, trace_id) for trace_id, _, _ in parents]
    assert len({t["request"].span_id for t in traces}) == len(traces)
    for t, (_, span_id, _) in zip(traces, parents):
        assert t["frontend"].parent_id == span_id and t["request"].parent_id == t["frontend"].span_id, t
    # requests of one batch share its inference span's times, and its size counts them all
    batches: dict[tuple[int, int], list] = {}
    for t in traces:
        batches.setdefault((t["inference"].start_ns, t["inference"].end_ns), []).append(t["inference"])
    sizes = {times: [span.attributes["batch.size"] for span in members] for times, members in batches.items()}
    for members in sizes.values():
        assert len(set(members)) == 1 and members[0] >= len(members), sizes
    assert max(len(m) for m in batches.values()) >= 2, f"no two requests shared a batch, nothing was compared: {sizes}"


def test_a_new_trace_without_a_parent_none_when_the_client_does_not_sample_and_errors_traced_uncomputed(traced):
    server, receiver = traced
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    url = f"{server.inference_url}/predictions/{spec.name}"
    headers = {**server.headers(), "Content-Type": sample.content_type}
    for traceparent in (None, "00-not-a-trace-01", f"00-{'0' * 32}-{'1' * 16}-01"):  # none, or one that is invalid
        request_id = f"root-{secrets.token_hex(4)}"
        extra = {"X-Request-ID": request_id, **({"traceparent": traceparent} if traceparent else {})}
        assert requests.post(url, data=sample.body, headers={**headers, **extra}, timeout=60).status_code == 200
        spans = receiver.wait_for(lambda got: len([s for s in got if s.attributes.get("request.id") == request_id]) == 2)
        frontend, root = sorted((s for s in spans if s.attributes.get("request.id") == request_id), key=role)
        assert frontend.parent_id == "" and frontend.trace_id == root.trace_id != "0" * 32, traceparent
        assert root.parent_id == frontend.span_id
    unsampled, _, traceparent = parent()
    requests.post(url, data=sample.body, headers={**headers, "traceparent": traceparent[:-2] + "00"}, timeout=60)
    bad_id, _, bad_parent = parent()
    refused = requests.post(url, data=b"\xff not an image", timeout=60, headers={**headers, "traceparent": bad_parent})
    assert refused.status_code == 400
    spans = trace_of(receiver, bad_id, computed=False)
    assert spans["request"].attributes["http.response.status_code"] == 400
    assert spans["frontend"].attributes["http.response.status_code"] == 400
    assert "preprocess" in spans and "inference" not in spans and "postprocess" not in spans
    # by now the worker has exported what came after the unsampled request; none of it is in its trace
    assert not [s for s in receiver.snapshot() if s.trace_id == unsampled]


def test_a_grpc_call_joins_its_clients_trace_with_the_workers_spans(traced):
    """The frontend records no span for gRPC: the worker's spans sit under the span the call's traceparent
    metadata names, its request span from the call's start and named by the call's x-request-id."""
    from loadtest.grpc_client import Client

    server, receiver = traced
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    trace_id, span_id, traceparent = parent()
    client = Client("127.0.0.1", server.ports.grpc_inference, server.keys()["inference"])
    try:
        client.stub.Predictions(client.pb2.PredictionsRequest(model_name=spec.name, input={"data": sample.body}),
                                metadata=[*client.metadata, ("traceparent", traceparent), ("x-request-id", "grpc-t")],
                                timeout=60)
    finally:
        client.close()
    wanted = {"request", *STAGES}
    spans = {role(s): s for s in receiver.wait_for(
        lambda got: wanted <= {role(s) for s in got if s.trace_id == trace_id}) if s.trace_id == trace_id}
    assert set(spans) == wanted, spans
    root = spans["request"]
    assert root.parent_id == span_id and root.attributes["request.id"] == "grpc-t"
    assert root.attributes["http.response.status_code"] == 200
    for stage in STAGES:
        assert spans[stage].parent_id == root.span_id and root.start_ns <= spans[stage].start_ns, stage


def test_a_streamed_generation_has_its_prefill_and_decode_in_the_workers_spans(traced):
    """A generator's request is traced when it has been answered in full: the worker's request span from the
    frontend's arrival to the last chunk, holding its queue, preprocess (the prompt read and tokenized), inference (its
    prefill) and decode (first to last decode step), in the client's trace under the frontend's span."""
    server, receiver = traced
    trace_id, span_id, traceparent = parent()
    tokens = 24
    with requests.post(f"{server.inference_url}/predictions/{GENERATOR}", stream=True, timeout=120,
                       json={"prompt": "Tell me about lighthouses.", "max_tokens": tokens, "temperature": 0,
                             "ignore_eos": True, "stream": True},
                       headers={**server.headers(), "traceparent": traceparent, "X-Request-ID": "gen-t"}) as answer:
        assert answer.status_code == 200, answer.text
        lines = [json.loads(line) for line in answer.iter_lines() if line]
    assert lines[-1]["usage"]["completion_tokens"] == tokens
    wanted = {"frontend", "request", "queue", "preprocess", "inference", "decode"}
    spans = {role(s): s for s in receiver.wait_for(
        lambda got: wanted <= {role(s) for s in got if s.trace_id == trace_id}) if s.trace_id == trace_id}
    frontend, root = spans["frontend"], spans["request"]
    assert frontend.parent_id == span_id and root.parent_id == frontend.span_id
    assert root.attributes["request.id"] == "gen-t" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["gen_ai.usage.output_tokens"] == tokens and root.attributes["gen_ai.usage.input_tokens"] > 0
    order = [spans[name] for name in ("queue", "preprocess", "inference", "decode")]
    assert all(s.parent_id == root.span_id for s in order)
    assert all(a.end_ns <= b.start_ns for a, b in zip(order, order[1:])), [(s.name, s.start_ns, s.end_ns) for s in order]
    assert root.start_ns <= order[0].start_ns and order[-1].end_ns <= root.end_ns
    assert spans["inference"].attributes["batch.size"] >= 1 and spans["decode"].attributes["batch.size"] >= 1


def test_tracing_is_off_unless_the_environment_names_a_collector():
    from handlers import tracing

    assert tracing.Tracing.start({}) is None and tracing.Tracing.start({"OTEL_SERVICE_NAME": "x"}) is None
    assert not tracing.enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    assert tracing.enabled({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"})
