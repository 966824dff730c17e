"""Traces through the fleet: with a collector named in the environment, the balancer (HAProxy, its Lua span:
serve_config/fleet/tracing.lua), the replica's frontend and its worker each record their span of a request, nested
in the trace the client's traceparent names, all exported over OTLP/HTTP to a real receiver (loadtest/otlp.py).
The replicas listen on host loopback here (isolation loopback): a replica in a network namespace of its own could
not reach a receiver on the host's loopback."""

from __future__ import annotations

import os
import secrets

import pytest
import requests

from loadtest.otlp import Receiver
from loadtest.payloads import payloads
from serve_config import fleet as fleets
from tests.ops.servers import store_with

pytestmark = [pytest.mark.fleet, pytest.mark.integration, pytest.mark.slow]
MODEL = "digits"
ROLES = ("balancer", "frontend", "request")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(fleet, receiver): one replica of digits behind HAProxy, every part of it exporting spans every 100 ms."""
    root = tmp_path_factory.mktemp("fleet-tracing")
    with Receiver() as receiver:
        saved = dict(os.environ)
        os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"})
        try:
            started = fleets.launch(root / "fleet", 1, [MODEL], model_store=store_with(root, MODEL),
                                    isolation="loopback")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            yield started, receiver
        finally:
            fleets.shutdown(root / "fleet")


def role(span) -> str:
    return {"haproxy": "balancer", "torchserve-frontend": "frontend"}.get(span.service, "request" if span.name.endswith(
        " request") else span.name)


def spans_of(receiver: Receiver, trace_id: str) -> dict:
    spans = receiver.wait_for(lambda got: set(ROLES) <= {role(s) for s in got if s.trace_id == trace_id})
    return {role(s): s for s in spans if s.trace_id == trace_id}


def test_the_balancer_the_frontend_and_the_worker_join_the_clients_trace_nested_in_time(traced):
    fleet, receiver = traced
    sample = payloads(MODEL, 1)[0]
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    answer = requests.post(f"{fleet.url}/predictions/{MODEL}", data=sample.body, timeout=60,
                           headers={**fleet.headers(), "Content-Type": sample.content_type, "X-Request-ID": "fleet-t",
                                    "traceparent": f"00-{trace_id}-{client_span}-01"})
    assert answer.status_code == 200, answer.text
    spans = spans_of(receiver, trace_id)
    balancer, frontend, worker = (spans[r] for r in ROLES)
    assert balancer.parent_id == client_span and balancer.kind == 2  # SERVER
    assert balancer.name == f"POST /predictions/{MODEL}"
    assert balancer.attributes == {"http.response.status_code": 200, "request.id": "fleet-t",
                                   "haproxy.server": fleet.replicas[0].name}
    assert frontend.parent_id == balancer.span_id and worker.parent_id == frontend.span_id
    assert {s.attributes["request.id"] for s in (frontend, worker)} == {"fleet-t"}
    # the balancer's span holds the frontend's (the worker's starts at the frontend's arrival, in whole ms)
    assert balancer.start_ns <= frontend.start_ns <= frontend.end_ns <= balancer.end_ns


def test_without_a_parent_the_balancer_starts_the_trace_and_an_unsampled_request_records_nothing(traced):
    fleet, receiver = traced
    sample = payloads(MODEL, 1)[0]
    url, headers = f"{fleet.url}/predictions/{MODEL}", {**fleet.headers(), "Content-Type": sample.content_type}
    for traceparent in (None, "00-not-a-trace-01"):
        request_id = f"root-{secrets.token_hex(4)}"
        extra = {"X-Request-ID": request_id, **({"traceparent": traceparent} if traceparent else {})}
        assert requests.post(url, data=sample.body, headers={**headers, **extra}, timeout=60).status_code == 200
        spans = receiver.wait_for(lambda got: {"balancer", "frontend"} <= {
            role(s) for s in got if s.attributes.get("request.id") == request_id})
        mine = {role(s): s for s in spans if s.attributes.get("request.id") == request_id}
        assert mine["balancer"].parent_id == "" and mine["frontend"].parent_id == mine["balancer"].span_id
        assert mine["frontend"].trace_id == mine["balancer"].trace_id
    unsampled = secrets.token_hex(16)
    assert requests.post(url, data=sample.body, timeout=60,
                         headers={**headers, "traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00"}).ok
    marker = secrets.token_hex(16)  # a later sampled request: once its spans are in, the unsampled one's would be
    assert requests.post(url, data=sample.body, timeout=60,
                         headers={**headers, "traceparent": f"00-{marker}-{secrets.token_hex(8)}-01"}).ok
    spans_of(receiver, marker)
    assert not [s for s in receiver.snapshot() if s.trace_id == unsampled]


def test_the_balancers_own_refusals_end_its_span_with_their_status(traced):
    fleet, receiver = traced
    sample = payloads(MODEL, 1)[0]
    url = f"{fleet.url}/predictions/{MODEL}"
    refused = {}
    for status, extra in ((401, {"Authorization": "Bearer wrong"}), (413, fleet.headers())):
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        headers = {"Content-Type": sample.content_type, "traceparent": f"00-{trace_id}-{client_span}-01", **extra}
        body = sample.body if status == 401 else b"\0" * (9 << 20)  # over max_request_size
        assert requests.post(url, data=body, headers=headers, timeout=60).status_code == status
        refused[status] = (trace_id, client_span)
    spans = receiver.wait_for(lambda got: {t for t, _ in refused.values()} <= {s.trace_id for s in got})
    for status, (trace_id, client_span) in refused.items():
        (balancer,) = [s for s in spans if s.trace_id == trace_id]  # it never reached a replica
        assert role(balancer) == "balancer" and balancer.parent_id == client_span
        assert balancer.attributes["http.response.status_code"] == status and "haproxy.server" not in balancer.attributes


def test_the_balancer_loads_no_tracing_unless_the_environment_names_a_collector():
    from serve_config.fleet.balancer import tracing_lines

    assert set(tracing_lines({}).values()) == {""}
    on = tracing_lines({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, 1024)
    assert "lua-load" in on["tracing_global"] and "lua.trace_start" in on["tracing_frontend"]
