"""The README's bring-your-own steps for a model of the tensor kind, exactly as written there: the registry entry
(`pair`: two inputs of different dtypes, one of dynamic length; two outputs), a self-describing checkpoint,
`make archive MODEL=pair`, `make serve SERVE_MODELS=pair`, and a call with Triton's HTTP client; the answer
equals the eager model on the same tensors. The server is stopped by `make stop` (its PID)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from models import checkpoint, registry
from serve_config.control import Ports
from tests.conftest import ROOT, TREE

pytestmark = pytest.mark.integration


def make(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(["make", "--no-print-directory", "RECIPE=quick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"make {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_tensor_model_brought_from_elsewhere_is_archived_served_and_answers_tritonclient(tmp_path):
    import tritonclient.http as httpclient

    spec = registry.get("pair")
    torch.manual_seed(0)
    model = checkpoint.build_model(spec.builder, spec.builder_kwargs).eval()  # "trained elsewhere"
    checkpoint.save(model, spec, TREE.checkpoint("pair"), metrics={})
    make("archive", "MODEL=pair")
    assert TREE.archive("pair").exists()

    ports, run_dir = Ports.free(), tmp_path / "run"
    make("serve", "SERVE_MODELS=pair", f"RUN_DIR={run_dir}", f"INFERENCE_PORT={ports.inference}",
         f"MANAGEMENT_PORT={ports.management}", f"METRICS_PORT={ports.metrics}",
         f"GRPC_PORTS={ports.grpc_inference} {ports.grpc_management}")
    try:
        token = make("-s", "token", f"RUN_DIR={run_dir}").strip()
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.inference}", network_timeout=60)
        metadata = client.get_model_metadata("pair", headers={"Authorization": f"Bearer {token}"})
        print(f"\npair metadata (tritonclient): {metadata}")
        features = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
        tokens = np.random.default_rng(1).integers(0, 100, size=(3, 11)).astype(np.int64)
        inputs = [httpclient.InferInput("features", [3, 8], "FP32"), httpclient.InferInput("tokens", [3, 11], "INT64")]
        inputs[0].set_data_from_numpy(features)  # binary tensors, as Triton's client sends by default
        inputs[1].set_data_from_numpy(tokens, binary_data=False)  # and one as JSON, in the same request
        result = client.infer("pair", inputs, outputs=[httpclient.InferRequestedOutput("strongest"),
                                                       httpclient.InferRequestedOutput("scores")],
                              headers={"Authorization": f"Bearer {token}"})
        mixed = _out_of_range_beside_good(ports.inference, token)
    finally:
        make("stop", f"RUN_DIR={run_dir}")
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 8]},
                                  {"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}]
    assert metadata["outputs"] == [{"name": "scores", "datatype": "FP32", "shape": [-1, 3]},
                                   {"name": "strongest", "datatype": "INT64", "shape": [-1]}]
    with torch.inference_mode():
        scores, strongest = model(torch.from_numpy(features), torch.from_numpy(tokens))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["strongest", "scores"]
    assert result.as_numpy("strongest").dtype == np.int64 and result.as_numpy("strongest").tolist() == strongest.tolist()
    assert result.as_numpy("scores").shape == (3, 3)
    assert np.abs(result.as_numpy("scores") - scores.numpy()).max() <= 1e-4
    for status, answer in mixed[:4]:  # each out-of-range request fails alone, with the input named
        assert status == 400 and "'tokens'" in answer["error"] and "0 to 99" in answer["error"], answer
    assert [status for status, _ in mixed[4:]] == [200] * 12, mixed[4:]


def _out_of_range_beside_good(port: int, token: str) -> list:
    """4 requests whose token ids lie outside pair's vocabulary (1000, -1000: they passed every check of the tensor
    kind and failed the whole batch before `value_range`) sent at once with 12 good ones: (status, body) each."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import requests

    def body(bad: int | None) -> str:
        tokens = [3, 1, 4, 1, 5, 9] if bad is None else [3, 1, bad, 1, 5, 9]
        return json.dumps({"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 8], "data": [0.5] * 8},
                                      {"name": "tokens", "datatype": "INT64", "shape": [1, 6], "data": tokens}]})

    bodies = [body(bad) for bad in (1000, -1000, 100, -1)] + [body(None)] * 12
    barrier = threading.Barrier(len(bodies))

    def send(text: str):
        barrier.wait(timeout=60)
        answer = requests.post(f"http://127.0.0.1:{port}/v2/models/pair/infer", data=text, timeout=60,
                               headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        return answer.status_code, answer.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))
