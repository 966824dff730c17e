"""Request IDs on a real TorchServe: every answer of every route and protocol carries X-Request-ID (the client's
when valid, a new one otherwise), refusals and errors included; the same ID is in the access log and in the
worker's log line for the request, and is an OIP answer's id when the request named none."""

from __future__ import annotations

import re
import uuid

import grpc
import pytest
import requests

from loadtest.grpc_client import Client, stubs
from loadtest.payloads import payloads
from tests.conftest import CLASSIFIERS, EMBEDDERS, logged, post_together

pytestmark = pytest.mark.integration

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def test_a_prediction_keeps_the_clients_id_or_gets_a_new_one_and_both_logs_show_it(server):
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    url = f"{server.inference_url}/predictions/{spec.name}"
    headers = {**server.headers(), "Content-Type": sample.content_type}
    mine = f"trace-{uuid.uuid4().hex}"
    kept = requests.post(url, data=sample.body, headers={**headers, "X-Request-ID": mine}, timeout=60)
    assert kept.status_code == 200 and kept.headers["X-Request-ID"] == mine
    assert logged(server, "access_log.log", f"id={mine}"), "the access log has no line with the request's ID"
    assert logged(server, "model_log.log", f"{mine} 200"), "the worker's log has no line with the request's ID"

    new = requests.post(url, data=sample.body, headers=headers, timeout=60)
    assert new.status_code == 200 and UUID.match(new.headers["X-Request-ID"])
    another = requests.post(url, data=sample.body, headers=headers, timeout=60)
    assert another.headers["X-Request-ID"] != new.headers["X-Request-ID"]
    for bad in ("x" * 129, "two words", "caf\u00e9".encode().decode("latin-1"), ""):
        answer = requests.post(url, data=sample.body, headers={**headers, "X-Request-ID": bad}, timeout=60)
        assert answer.status_code == 200 and UUID.match(answer.headers["X-Request-ID"]), bad
    longest = "a" * 128
    answer = requests.post(url, data=sample.body, headers={**headers, "X-Request-ID": longest}, timeout=60)
    assert answer.headers["X-Request-ID"] == longest


def test_requests_that_share_an_id_in_one_batch_are_each_answered(server):
    """TorchServe holds a batch's jobs by their ID: a client's X-Request-ID is the request's ID, never its job's, so
    requests sent together with one ID are each answered, each with that ID."""
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    jobs = [(spec.name, sample.body, {"Content-Type": sample.content_type, "X-Request-ID": "shared-1"})] * 6
    answers = post_together(server, jobs)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert {a.headers["X-Request-ID"] for a in answers} == {"shared-1"}
    assert len({a.text for a in answers}) == 1


def test_refusals_and_errors_carry_the_id_on_every_port(server):
    spec = CLASSIFIERS[0]
    cases = [
        ("POST", f"{server.inference_url}/predictions/{spec.name}", {}, 401),  # no key
        ("POST", f"{server.inference_url}/predictions/no-such-model", server.headers(), 404),
        ("POST", f"{server.inference_url}/predictions/{spec.name}", {**server.headers(), "Content-Type": "image/png"},
         400),
        ("GET", f"{server.management_url}/models", server.headers("management"), 200),
        ("GET", f"{server.inference_url}/v2/health/ready", server.headers(), 200),
        ("GET", f"{server.inference_url}/v1/models", server.headers(), 200),
        ("GET", f"{server.metrics_url}/metrics", server.headers("management"), 200),
    ]
    for method, url, headers, status in cases:
        mine = f"case-{status}-{uuid.uuid4().hex[:8]}"
        answer = requests.request(method, url, headers={**headers, "X-Request-ID": mine}, data=b"not an image",
                                  timeout=60)
        assert answer.status_code == status, (url, answer.text)
        assert answer.headers.get("X-Request-ID") == mine, (url, dict(answer.headers))


def test_an_infer_answer_names_the_request_id_unless_the_request_named_its_own(server):
    spec = EMBEDDERS[0]
    url = f"{server.inference_url}/v2/models/{spec.name}/infer"
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a request to follow"]}]}
    answer = requests.post(url, json=body, headers={**server.headers(), "X-Request-ID": "oip-1"}, timeout=60)
    assert answer.status_code == 200 and answer.json()["id"] == "oip-1" == answer.headers["X-Request-ID"]
    named = requests.post(url, json={**body, "id": "mine"}, headers={**server.headers(), "X-Request-ID": "oip-2"},
                          timeout=60)
    assert named.json()["id"] == "mine" and named.headers["X-Request-ID"] == "oip-2"
    unnamed = requests.post(url, json=body, headers=server.headers(), timeout=60)
    assert UUID.match(unnamed.json()["id"]) and unnamed.json()["id"] == unnamed.headers["X-Request-ID"]


def test_the_openai_routes_answer_with_the_id(server):
    spec = EMBEDDERS[0]
    answer = requests.post(f"{server.inference_url}/v1/embeddings", json={"model": spec.name, "input": "hello"},
                           headers={**server.headers(), "X-Request-ID": "emb-1"}, timeout=60)
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "emb-1"
    missing = requests.post(f"{server.inference_url}/v1/embeddings", json={"model": "nothing", "input": "hello"},
                            headers={**server.headers(), "X-Request-ID": "emb-2"}, timeout=60)
    assert missing.status_code == 404 and missing.headers["X-Request-ID"] == "emb-2"


def test_a_grpc_call_answers_with_its_clients_id_or_a_new_one_and_its_worker_logs_it(server):
    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    client = Client("127.0.0.1", server.ports.grpc_inference, server.keys()["inference"])
    try:
        request = client.pb2.PredictionsRequest(model_name=spec.name, input={"data": sample.body})
        _, call = client.stub.Predictions.with_call(request, metadata=[*client.metadata, ("x-request-id", "grpc-1")],
                                                    timeout=60)
        assert dict(call.initial_metadata()).get("x-request-id") == "grpc-1"
        _, call = client.stub.Predictions.with_call(request, metadata=client.metadata, timeout=60)
        assert UUID.match(dict(call.initial_metadata()).get("x-request-id", ""))
        with pytest.raises(grpc.RpcError) as refused:
            client.stub.Predictions(request, metadata=[("x-request-id", "grpc-2")], timeout=60)
        assert dict(refused.value.trailing_metadata()).get("x-request-id") == "grpc-2"
    finally:
        client.close()
    assert logged(server, "access_log.log", "id=grpc-1")
    # TorchServe's gRPC services give each job a UUID of their own: the worker names the call's ID all the same
    assert logged(server, "model_log.log", "grpc-1 200"), "the worker's log has no line with the gRPC call's ID"
    pb2, pb2_grpc = stubs(proto="open_inference_grpc")
    metadata = [("authorization", f"Bearer {server.keys()['inference']}")]
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ServerLive.with_call(pb2.ServerLiveRequest(), timeout=10,
                                            metadata=[*metadata, ("x-request-id", "grpc-3")])
        assert dict(call.initial_metadata()).get("x-request-id") == "grpc-3"
        infer = pb2.ModelInferRequest(model_name=spec.name, inputs=[pb2.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=pb2.InferTensorContents(bytes_contents=[sample.body]))])
        reply, call = stub.ModelInfer.with_call(infer, timeout=60, metadata=[*metadata, ("x-request-id", "grpc-4")])
        assert dict(call.initial_metadata()).get("x-request-id") == "grpc-4"
        assert reply.id == "grpc-4"  # proto3 cannot tell an unset id from "": the request named none
    assert logged(server, "model_log.log", "grpc-4 200"), "the worker's log has no line with the ModelInfer call's ID"
