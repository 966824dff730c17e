"""The README's bring-your-own steps for a model of the tensor kind, run from the README's own text: its registry
entry (`pair`: two inputs of different dtypes, one of dynamic length; two outputs) is the one in
models/registry.py and in its REGISTRY table; its checkpoint block runs as written (with the test tree as
BUILD_TREE, as `make RECIPE=quick` sets it); its make lines run as written (RECIPE=quick and free ports added); its
Triton client block runs as written against that server (its port put in); the answer equals the eager model on
the same tensors. The server is stopped by `make stop` (its PID)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import numpy as np
import pytest
import torch

from models import checkpoint, registry
from models.paths import TREE_VARIABLE
from serve_config.control import Ports
from tests.conftest import ROOT, TREE

pytestmark = pytest.mark.integration
README_URL = "127.0.0.1:8080"


def make(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(["make", "--no-print-directory", "RECIPE=quick", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"make {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout


def readme_steps() -> tuple[list[str], list[str]]:
    """The README's bring-your-own section: its python blocks and its bash lines, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Bring your own model"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    bash = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines() if line]
    return python, bash


def test_the_readmes_registry_entry_is_the_registrys(monkeypatch):
    (entry, *_), _ = readme_steps()
    source = (ROOT / "models" / "registry.py").read_text()
    assert entry.strip() in source, "the README's entry differs from models/registry.py's"
    table = source[source.index("REGISTRY: dict[str, ModelSpec]"):]
    assert re.search(r"\bPAIR\b", table[:table.index("}")]), "pair is not in the REGISTRY table"
    assert registry.get("pair").kind == "tensor"


def test_a_tensor_model_brought_from_elsewhere_is_archived_served_and_answers_tritonclient(tmp_path, monkeypatch):
    (_, save, client_block), bash = readme_steps()
    spec = registry.get("pair")
    torch.manual_seed(0)
    model = checkpoint.build_model(spec.builder, spec.builder_kwargs).eval()  # "trained elsewhere"
    monkeypatch.setenv(TREE_VARIABLE, str(TREE.root))  # what make RECIPE=quick sets for what it runs
    exec(save, {"my_trained_model": model})  # noqa: S102 - the README's block, as written
    assert TREE.checkpoint("pair").exists()

    ports, run_dir = Ports.free(), tmp_path / "run"
    server = [f"RUN_DIR={run_dir}", f"INFERENCE_PORT={ports.inference}", f"MANAGEMENT_PORT={ports.management}",
              f"METRICS_PORT={ports.metrics}", f"GRPC_PORTS={ports.grpc_inference} {ports.grpc_management}"]
    assert [shlex.split(line)[:2] for line in bash] == [["make", "archive"], ["make", "serve"]], bash
    try:
        for line in bash:
            words = shlex.split(line)
            make(*words[1:], *(server if words[1] == "serve" else []))
            if words[1] == "archive":
                assert TREE.archive("pair").exists()
        token = make("-s", "token", f"RUN_DIR={run_dir}").strip()
        assert README_URL in client_block
        shown: dict = {"token": token}
        exec(client_block.replace(README_URL, f"127.0.0.1:{ports.inference}"), shown)  # noqa: S102
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports.inference}", network_timeout=60)
        metadata = client.get_model_metadata("pair", headers={"Authorization": f"Bearer {token}"})
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
    with torch.inference_mode():  # the README's own call: its random tensors, answered as eager answers them
        shown_scores, shown_strongest = model(torch.from_numpy(sent(shown["features"])),
                                              torch.from_numpy(sent(shown["tokens"])))
    assert np.abs(shown["result"].as_numpy("scores") - shown_scores.numpy()).max() <= 1e-4
    assert shown["result"].as_numpy("strongest").tolist() == shown_strongest.tolist()
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


def sent(tensor) -> np.ndarray:
    """What a tritonclient InferInput carries (set in binary, its default), as an array."""
    dtype = {"FP32": np.float32, "INT64": np.int64}[tensor.datatype()]
    return np.frombuffer(tensor._get_binary_data(), dtype=dtype).reshape(tensor.shape()).copy()


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
