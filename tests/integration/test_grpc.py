"""TorchServe's own gRPC inference API (inference.proto, compiled at test time from the installed
model-server.jar) against a real TorchServe: Ping, and Predictions for every model with the same answer as
REST, in every body form, with no media type to go by; a call without the key is refused."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import requests

from loadtest.grpc_client import Client
from loadtest.payloads import payloads
from handlers.batch_metrics import EXPIRED
from loadtest.bench.prometheus import scrape
from tests.conftest import CLASSIFIERS, EMBEDDERS, SERVED, logged, worker_pids
from tests.kinds import checks

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(server):
    client = Client("127.0.0.1", server.ports.grpc_inference, server.keys()["inference"])
    yield client
    client.close()


def rest(server, model: str, body: bytes, media: str):
    return requests.post(f"{server.inference_url}/predictions/{model}", data=body, timeout=60,
                         headers={**server.headers(), "Content-Type": media})


def test_ping_answers_healthy_with_the_key(client):
    assert json.loads(client.ping())["status"] == "Healthy"


def test_a_call_without_the_key_or_with_a_wrong_one_is_refused(server):
    for token in (None, "wrong-key"):
        anonymous = Client("127.0.0.1", server.ports.grpc_inference, token)
        try:
            with pytest.raises(grpc.RpcError) as info:
                anonymous.predict(SERVED[0].name, payloads(SERVED[0].name, 1)[0].body)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError):
                anonymous.ping()
        finally:
            anonymous.close()


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_every_model_answers_over_grpc_as_over_rest(server, client, spec):
    for sample in payloads(spec.name, 4):
        native = rest(server, spec.name, sample.body, sample.content_type)
        assert native.status_code == 200, native.text
        answer = json.loads(client.predict(spec.name, sample.body))
        checks(spec).same(answer, native.json())


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_json_and_infer_requests_are_told_apart_by_their_bytes(server, client, spec):
    """With no Content-Type, a JSON object is read as JSON (the native form or an OIP infer request)."""
    sample = payloads(spec.name, 1)[0]
    native, infer = checks(spec).json_forms(sample)
    if native is not None:  # the kind's own JSON form answers as its REST call does
        checks(spec).same(json.loads(client.predict(spec.name, native)),
                          requests.post(f"{server.inference_url}/predictions/{spec.name}", data=native, timeout=60,
                                        headers={**server.headers(), "Content-Type": "application/json"}).json())
    reply = json.loads(client.predict(spec.name, json.dumps(infer).encode()))
    assert reply["model_name"] == spec.name and reply["outputs"][0]["shape"][0] == 1


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_bad_input_over_grpc_is_a_4xx_body_and_the_workers_stay(server, client, spec):
    """TorchServe 0.12 gives a Predictions call its handler's body with gRPC status OK (its gRPC frontend drops
    the per-request status), so the 4xx is in the body; the workers are the same before and after."""
    pids = worker_pids(server, spec.name)
    bad = [b"", b"\xff\xfe\xfa not anything", b'{"inputs": [{"name": "x", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}',
           b'{"image": 5, "text": 5}']
    for body in bad:
        answer = json.loads(client.predict(spec.name, body))
        status = answer.get("code", 400 if "error" in answer else None)
        assert status is not None and 400 <= status < 500, (body, answer)
    assert worker_pids(server, spec.name) == pids


def test_oip_health_over_rest_and_grpc_with_the_key(server):
    """What ts_open_inference_protocol and our endpoint plugin add (docs/protocols.md): /v2/health/* and model
    readiness over REST, and KServe's GRPCInferenceService beside TorchServe's own, all behind the key."""
    from loadtest.grpc_client import stubs

    for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        assert requests.get(f"{server.inference_url}{path}", headers=server.headers(), timeout=10).json()[key] is True
        assert requests.get(f"{server.inference_url}{path}", timeout=10).status_code == 401
    # readiness names each model's state too (serve_config/control/probe.py reports which one is not ready)
    served = requests.get(f"{server.inference_url}/v2/health/ready", headers=server.headers(), timeout=10).json()
    assert served["models"] == {spec.name: True for spec in SERVED}, served
    # model readiness and metadata over REST come from our endpoint plugin (tests/integration/test_oip_metadata.py)
    assert requests.get(f"{server.inference_url}/v2/models/{SERVED[0].name}/ready", headers=server.headers(),
                        timeout=10).json()["ready"] is True
    pb2, pb2_grpc = stubs(proto="open_inference_grpc")
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        metadata = [("authorization", f"Bearer {server.keys()['inference']}")]
        assert stub.ServerLive(pb2.ServerLiveRequest(), metadata=metadata, timeout=10).live
        for spec in SERVED:
            assert stub.ModelReady(pb2.ModelReadyRequest(name=spec.name), metadata=metadata, timeout=10).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerReady(pb2.ServerReadyRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_oip_grpc_model_infer_reaches_the_image_handler(server):
    from loadtest.grpc_client import stubs

    spec = CLASSIFIERS[0]
    sample = payloads(spec.name, 1)[0]
    pb2, pb2_grpc = stubs(proto="open_inference_grpc")
    request = pb2.ModelInferRequest(model_name=spec.name, id="g", inputs=[pb2.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb2.InferTensorContents(bytes_contents=[sample.body]))])
    with grpc.insecure_channel(f"127.0.0.1:{server.ports.grpc_inference}") as channel:
        reply = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("authorization", f"Bearer {server.keys()['inference']}")], timeout=60)
    native = rest(server, spec.name, sample.body, sample.content_type).json()
    index = next(o for o in reply.outputs if o.name == "index")
    assert reply.id == "g" and list(index.shape) == [1, len(native)]
    assert list(index.contents.int64_contents) == [p["index"] for p in native]


def test_a_calls_deadline_reaches_the_worker_which_answers_it_uncomputed_once_it_has_passed(server, client):
    """A gRPC client's timeout (its call's deadline, grpc-timeout) is the request's deadline in the worker, as
    X-Request-Timeout-Ms is an HTTP client's: a call queued behind at least 12 requests of 16 texts each (three
    batches of 4 for two workers) with a deadline of 200 ms ends DEADLINE_EXCEEDED and the worker answers its job
    504 without computing it, while the requests ahead, with no deadline, are all answered; a call with a live
    deadline is answered."""
    spec = EMBEDDERS[0]
    sample = payloads(spec.name, 1)[0]
    answer = client.stub.Predictions(client.pb2.PredictionsRequest(model_name=spec.name, input={"data": sample.body}),
                                     metadata=[*client.metadata, ("x-request-id", "grpc-live")], timeout=60)
    assert json.loads(answer.prediction) == rest(server, spec.name, sample.body, sample.content_type).json()
    assert logged(server, "model_log.log", "grpc-live 200")
    before = scrape(server.metrics_url, spec.name, server.headers("management")).get(EXPIRED, 0.0)
    heavy = json.dumps({"texts": [sample.body.decode()] * 16}).encode()
    described = f"{server.management_url}/models/{spec.name}"

    def pending() -> int:
        model = requests.get(described, headers=server.headers("management"), timeout=10).json()[0]
        return model["jobQueueStatus"]["pendingRequests"]

    with ThreadPoolExecutor(max_workers=32) as pool:
        ahead = [pool.submit(rest, server, spec.name, heavy, "application/json") for _ in range(32)]
        for _ in range(600):  # the burst in the queue first, so that the call waits behind it
            if pending() >= 12:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the burst never queued 12 requests")
        with pytest.raises(grpc.RpcError) as late:
            client.stub.Predictions(client.pb2.PredictionsRequest(model_name=spec.name, input={"data": sample.body}),
                                    metadata=[*client.metadata, ("x-request-id", "grpc-late")], timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert [future.result().status_code for future in ahead] == [200] * 32
    assert logged(server, "model_log.log", "grpc-late 504"), "the worker did not answer the late call's job 504"
    for _ in range(50):  # the counter reaches /metrics through the worker's metric log lines
        expired = scrape(server.metrics_url, spec.name, server.headers("management")).get(EXPIRED, 0.0) - before
        if expired >= 1:
            break
        time.sleep(0.2)
    assert expired == 1
