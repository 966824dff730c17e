"""The CPU image's runtime, which has no torch: TorchServe started from it (`make cpu-venv`: the lock and the worker
patch the image installs, requirements/runtime-cpu.txt and serve_config/torch_free.py) serves every default model,
each answer what its kind's checks hold offline, from workers of that environment; a model that needs torch is
refused at load with the reason, and the server goes on serving the others."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from models.paths import ROOT
from tests.conftest import SERVED, TREE, assert_serves_every_model, built, logged, worker_pids
from tests.kinds import model_store

CPU_VENV = Path(os.environ.get("CPU_VENV") or ROOT / "build" / "venv-cpu")


@pytest.fixture(scope="module")
def python() -> Path:
    return built(CPU_VENV / "bin" / "python")


@pytest.fixture(scope="module")
def torch_free_server(python, tmp_path_factory):
    from serve_config.control import Ports, start, stop

    for spec in SERVED:
        built(TREE.archive(spec.name))
    run_dir = tmp_path_factory.mktemp("torch-free")
    store = model_store(SERVED, tmp_path_factory.mktemp("store"), TREE)
    if not (store / "chat-tiny.mar").exists():  # registered later, to be refused (a store of the tests' own)
        from export.manifest import copy_archive

        copy_archive(built(TREE.archive("chat-tiny")), store / "chat-tiny.mar")
    try:
        yield start(run_dir, [s.name for s in SERVED], ports=Ports.free(), model_store=store, python=python)
    finally:
        stop(run_dir)


def test_the_cpu_runtime_has_no_torch_and_its_worker_starts_without_it(python):
    torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    site = next(CPU_VENV.glob("lib/python3*/site-packages"))
    assert not any((site / name).exists() for name in ("torch", "torchvision", "nvidia", "triton"))
    worker = subprocess.run([str(python), "-c", "import ts.model_service_worker, ts.torch_handler.request_envelope"],
                            capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr


def test_a_torch_free_server_answers_every_default_model_as_offline(torch_free_server, python):
    server = torch_free_server
    assert_serves_every_model(server.inference_url, server.headers("inference"))
    for spec in SERVED:  # the answers came from workers started with the torch-free environment's interpreter
        for pid in worker_pids(server, spec.name):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert Path(command[0].decode()).absolute() == python.absolute(), (pid, command[:2])


def test_a_model_that_needs_torch_is_refused_at_load_with_the_reason(torch_free_server):
    from serve_config.control import ModelLoadError, wait_ready
    from serve_config.control.lifecycle import register

    server = torch_free_server
    register(server, "chat-tiny.mar", 1)
    with pytest.raises(ModelLoadError, match="chat-tiny"):
        wait_ready(server, ["chat-tiny"], timeout=120)
    assert logged(server, "model_log.log", "needs torch, which this environment lacks")
    import requests

    gone = requests.delete(f"{server.management_url}/models/chat-tiny", headers=server.headers("management"),
                           timeout=60)
    assert gone.status_code == 200, gone.text
    assert_serves_every_model(server.inference_url, server.headers("inference"), samples=1)  # the others served on
