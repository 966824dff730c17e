"""The Open Inference Protocol (KServe v2) against a real TorchServe, through clients this project did not write:
Triton's HTTP client (JSON and binary tensors) and the KServe SDK's REST client. Several rows per request,
sent at the same moment as native requests to the same model, so both forms share batches; each answer must
parse in its client and equal the native answer (embeddings within 1e-5)."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from handlers.batch_metrics import BATCHES, REQUESTS
from loadtest.bench.prometheus import scrape
from loadtest.payloads import payloads
from models.paths import model_config_values
from tests.conftest import CLASSIFIERS, SERVED, worker_pids
from tests.kinds import checks, infer_samples

pytestmark = pytest.mark.integration
ROWS = 5


class Rows:
    """A model's rows for one request in each client's terms (its kind's checks, tests/kinds), and the native
    answers to compare with."""

    def __init__(self, spec, server) -> None:
        self.spec, self.server, self.checks = spec, server, checks(spec)
        self.samples = infer_samples(spec, ROWS)

    def inputs(self, *, binary: bool) -> list[tuple[str, str, np.ndarray]]:
        return self.checks.oip_inputs(self.samples, binary=binary)

    def native(self) -> list:
        url = f"{self.server.inference_url}/predictions/{self.spec.name}"
        return [requests.post(url, data=s.body, headers={**self.server.headers(), "Content-Type": s.content_type},
                              timeout=60).json() for s in self.samples]

    def assert_matches(self, outputs: dict[str, np.ndarray], native: list) -> None:
        self.checks.assert_oip(outputs, native)


def json_data(array: np.ndarray) -> list:
    """A tensor's data as JSON values (BYTES as text)."""
    return [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]


def triton(server, rows: Rows, *, binary: bool) -> dict[str, np.ndarray]:
    """Binary: tensors in the binary extension both ways (the client asks every output so, naming none). JSON:
    JSON inputs, and every output the metadata lists asked for as JSON by name."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=60)
    headers = dict(server.headers())
    tensors = []
    for name, datatype, array in rows.inputs(binary=binary):
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    asked = None if binary else [httpclient.InferRequestedOutput(o["name"], binary_data=False)
                                 for o in client.get_model_metadata(rows.spec.name, headers=headers)["outputs"]]
    result = client.infer(rows.spec.name, tensors, outputs=asked, request_id=f"triton-{binary}", headers=headers)
    assert result.get_response()["id"] == f"triton-{binary}"
    assert result.get_response()["model_name"] == rows.spec.name
    outputs = result.get_response()["outputs"]
    assert all(("binary_data_size" in o.get("parameters", {})) == binary and ("data" in o) != binary for o in outputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in outputs}


def kserve_rest(server, rows: Rows) -> dict[str, np.ndarray]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def call():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        request = InferRequest(model_name=rows.spec.name, request_id="kserve",
                               infer_inputs=[InferInput(name, list(array.shape), datatype, json_data(array))
                                             for name, datatype, array in rows.inputs(binary=False)])
        try:
            return await client.infer(server.inference_url, request, model_name=rows.spec.name,
                                      headers=dict(server.headers()))
        finally:
            await client.close()

    response = asyncio.run(call())
    assert response.id == "kserve" and response.model_name == rows.spec.name
    return {o.name: o.as_numpy() for o in response.outputs}


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_real_clients_get_the_native_answers_while_native_requests_share_their_batches(server, spec):
    rows = Rows(spec, server)
    native_answers = rows.native()
    pids = worker_pids(server, spec.name)
    before = scrape(server.metrics_url, spec.name, server.headers("management"))
    calls = {"triton json": lambda: triton(server, rows, binary=False),
             "triton binary": lambda: triton(server, rows, binary=True),
             "kserve rest": lambda: kserve_rest(server, rows)}
    natives = [(s.body, s.content_type) for s in rows.samples] * 2
    barrier = threading.Barrier(len(calls) + len(natives))

    def run(job):
        barrier.wait(timeout=60)
        if isinstance(job, str):
            return calls[job]()
        body, media = job
        return requests.post(f"{server.inference_url}/predictions/{spec.name}", data=body, timeout=60,
                             headers={**server.headers(), "Content-Type": media})

    jobs = [*calls, *natives]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = dict(zip(range(len(jobs)), pool.map(run, jobs)))
    for i, name in enumerate(calls):
        rows.assert_matches(results[i], native_answers)
    for i in range(len(calls), len(jobs)):
        assert results[i].status_code == 200, results[i].text
    after = scrape(server.metrics_url, spec.name, server.headers("management"))
    handled = after.get(REQUESTS, 0) - before.get(REQUESTS, 0)
    assert handled >= len(jobs) and after.get(BATCHES, 0) - before.get(BATCHES, 0) < handled, "never batched together"
    assert worker_pids(server, spec.name) == pids


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_pixels_and_the_models_own_layout_give_the_same_answer_as_the_encoded_image(server, spec):
    """UINT8 [n, h, w, c] pixels (any size; the preset resizes) and FP32 in the model's input layout (already
    preprocessed) classify as the encoded image does."""
    import tritonclient.http as httpclient
    from PIL import Image

    from models.preprocessing import build_preset, decode_for

    sample = payloads(spec.name, 1)[0]
    image = Image.open(__import__("io").BytesIO(sample.body)).convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8)[None]
    preset = build_preset(spec.preset)
    model_input = preset(decode_for(preset, sample.body, max_pixels=10**8))[None]
    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=60)
    answers = {}
    for name, array, datatype in (("pixels", pixels, "UINT8"), ("layout", model_input.astype(np.float32), "FP32")):
        tensor = httpclient.InferInput(spec.inputs[0].name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=name == "pixels")
        answers[name] = client.infer(spec.name, [tensor], headers=dict(server.headers()))
    native = requests.post(f"{server.inference_url}/predictions/{spec.name}", data=sample.body, timeout=60,
                           headers={**server.headers(), "Content-Type": sample.content_type}).json()
    assert answers["layout"].as_numpy("index")[0].tolist() == [p["index"] for p in native]
    assert answers["pixels"].as_numpy("index")[0][0] == native[0]["index"]


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_requested_outputs_alone_are_answered_in_order(server, spec):
    rows = Rows(spec, server)
    wanted = rows.checks.some_outputs
    body = {"id": "only", "inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype,
                                      "data": json_data(array)} for name, datatype, array in rows.inputs(binary=False)],
            "outputs": [{"name": n} for n in wanted]}
    answer = requests.post(f"{server.inference_url}/v2/models/{spec.name}/infer", json=body, timeout=60,
                           headers=server.headers())
    assert answer.status_code == 200, answer.text
    reply = answer.json()
    assert reply["id"] == "only" and reply["model_name"] == spec.name and reply["model_version"]
    assert [o["name"] for o in reply["outputs"]] == wanted


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritons_timeout_parameter_is_a_deadline_the_queue_can_pass(server, binary):
    """Triton's client sends `timeout` (microseconds) in the request's parameters, JSON or in the binary extension's
    header: 1 us passes before any worker sees the request (504 in OIP's form, not computed); a minute does not."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    spec = CLASSIFIERS[0]
    rows = Rows(spec, server)
    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=60)
    tensors = []
    for name, datatype, array in rows.inputs(binary=binary):
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    with pytest.raises(InferenceServerException) as late:
        client.infer(spec.name, tensors, timeout=1, headers=dict(server.headers()))
    assert late.value.status() == "504" and "past its deadline" in late.value.message(), late.value
    answer = client.infer(spec.name, tensors, timeout=60_000_000, headers=dict(server.headers()))
    rows.assert_matches({o["name"]: answer.as_numpy(o["name"]) for o in answer.get_response()["outputs"]},
                        rows.native())


def test_a_request_of_more_rows_than_a_forward_pass_holds_is_split(server):
    """max_rows_per_pass bounds a forward pass (verified batch sizes); a request of more rows is still answered,
    every row."""
    spec = CLASSIFIERS[0]
    handler = model_config_values(spec.name)["handler"]
    count = handler["max_rows_per_pass"] + 3
    assert count <= handler["max_rows_per_request"], "the config leaves no room for a request larger than a pass"
    sample = payloads(spec.name, 1)[0]
    body = {"inputs": [{"name": "image", "shape": [count], "datatype": "BYTES",
                        "data": [base64.b64encode(sample.body).decode()] * count}]}
    answer = requests.post(f"{server.inference_url}/v2/models/{spec.name}/infer", json=body, timeout=120,
                           headers=server.headers())
    assert answer.status_code == 200, answer.text
    labels = answer.json()["outputs"][0]
    assert labels["shape"][0] == count and len(set(labels["data"][::labels["shape"][1]])) == 1
