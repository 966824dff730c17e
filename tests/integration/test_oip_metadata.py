"""The Open Inference Protocol's model metadata and readiness over REST (the frontend plugin, handlers/frontend),
on the same TorchServe, port and token as everything else, asked with the clients users have: Triton's HTTP
client and the KServe SDK. Every served model, by name and with its version; what the metadata says a model takes
and gives is what its infer answers hold; readiness follows the model's workers."""

from __future__ import annotations

import asyncio
import json

import pytest
import requests

from export import archive
from export import manifest as mf
from serve_config.control.deploys import started_copy
from tests.conftest import SERVED, TREE, assert_oip_metadata, worker_pids
from tests.kinds import checks, infer_samples

pytestmark = pytest.mark.integration


def triton(server):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"), network_timeout=60)


def kserve_ready(server, model: str, headers: dict) -> bool:
    from kserve import InferenceRESTClient, RESTConfig

    async def ask():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            return await client.is_model_ready(server.inference_url, model, headers=headers)
        finally:
            await client.close()

    return asyncio.run(ask())


def fits(shape: list[int], got: list[int]) -> bool:
    return len(shape) == len(got) and all(s in (-1, g) for s, g in zip(shape, got))


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
def test_metadata_and_readiness_of_every_model_through_real_clients(server, spec):
    client, headers = triton(server), dict(server.headers())
    # what the served archive's signature.json says, ready
    assert_oip_metadata(server.inference_url, headers, [spec.name], lambda name: started_copy(server.run_dir, name))
    metadata = client.get_model_metadata(spec.name, headers=headers)
    print(f"\n{spec.name} metadata (tritonclient): {json.dumps(metadata)}")
    assert metadata["versions"] == ["1.0"]
    served = mf.read(TREE.artifacts(spec.name))["artifacts"][spec.serve_artifact]["file"]  # model.onnx, model.int8.onnx...
    assert metadata["platform"] == archive.platform(served) != "pytorch"
    assert client.get_model_metadata(spec.name, model_version="1.0", headers=headers) == metadata
    assert client.is_model_ready(spec.name, model_version="1.0", headers=headers)
    assert kserve_ready(server, spec.name, headers)

    # what the metadata says comes out is what an infer answer holds: names, datatypes, shapes (-1: any)
    answer = requests.post(f"{server.inference_url}/v2/models/{spec.name}/infer", timeout=60, headers=headers,
                           data=checks(spec).good_infer(infer_samples(spec, 1)[0]))
    assert answer.status_code == 200, answer.text
    outputs = answer.json()["outputs"]
    assert [(o["name"], o["datatype"]) for o in outputs] == [(o["name"], o["datatype"]) for o in metadata["outputs"]]
    assert all(fits(m["shape"], o["shape"]) for m, o in zip(metadata["outputs"], outputs)), (metadata, outputs)


def test_metadata_and_readiness_need_the_key_and_name_what_is_not_served(server):
    from tritonclient.utils import InferenceServerException

    name = SERVED[0].name
    for path in (f"/v2/models/{name}", f"/v2/models/{name}/ready", f"/v2/models/{name}/versions/1.0"):
        assert requests.get(f"{server.inference_url}{path}", timeout=10).status_code == 401  # no key
    client, headers = triton(server), dict(server.headers())
    with pytest.raises(InferenceServerException, match="not served"):
        client.get_model_metadata("no-such-model", headers=headers)
    with pytest.raises(InferenceServerException, match="version 9.9 is not served"):
        client.get_model_metadata(name, model_version="9.9", headers=headers)
    assert not client.is_model_ready("no-such-model", headers=headers)
    assert not client.is_model_ready(name, model_version="9.9", headers=headers)
    assert requests.get(f"{server.inference_url}/v2/nothing/here", headers=headers, timeout=10).status_code == 404
    server_metadata = client.get_server_metadata(headers=headers)
    assert server_metadata["name"] == "torchserve" and "model_metadata" in server_metadata["extensions"]
    assert client.is_server_live(headers=headers) and client.is_server_ready(headers=headers)


def test_ready_is_false_while_a_model_has_no_ready_worker(server):
    """Scaled to no worker, a model is not ready (and so neither is the server); scaled back, it is."""
    spec = SERVED[0]
    client, headers = triton(server), dict(server.headers())
    workers = len(worker_pids(server, spec.name))
    management = f"{server.management_url}/models/{spec.name}"
    scale = requests.put(f"{management}?min_worker=0&max_worker=0&synchronous=true", headers=server.headers("management"),
                         timeout=120)
    assert scale.status_code == 200, scale.text
    try:
        assert not client.is_model_ready(spec.name, headers=headers)
        assert not client.is_server_ready(headers=headers)
        assert all(client.is_model_ready(s.name, headers=headers) for s in SERVED[1:])
    finally:
        back = requests.put(f"{management}?min_worker={workers}&max_worker={workers}&synchronous=true",
                            headers=server.headers("management"), timeout=180)
    assert back.status_code == 200, back.text
    assert client.is_model_ready(spec.name, headers=headers) and client.is_server_ready(headers=headers)
