"""Device policy and backend selection, for both the CPU and the GPU case, on any host."""

from __future__ import annotations

import pytest
import torch

from models.runtime import ThreadBudget, ort_providers, select_device


@pytest.mark.parametrize("gpu_id, cuda, expected", [
    (None, True, "cpu"),
    (0, False, "cpu"),
    ("", True, "cpu"),
    (0, True, "cuda:0"),
    (3, True, "cuda:3"),
    ("1", True, "cuda:1"),
])
def test_device_follows_the_workers_gpu_id_only_when_cuda_is_usable(gpu_id, cuda, expected):
    assert select_device(gpu_id, cuda_available=cuda) == torch.device(expected)


def test_ort_uses_cuda_with_the_workers_device_id_only_on_a_cuda_device():
    gpu_host = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(torch.device("cuda", 2), gpu_host) == [
        ("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    assert ort_providers(torch.device("cpu"), gpu_host) == ["CPUExecutionProvider"]
    assert ort_providers(torch.device("cuda", 0), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_this_hosts_providers_never_ask_for_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert ort_providers(select_device(0)) == ["CPUExecutionProvider"]


def test_thread_budget_is_validated():
    with pytest.raises(ValueError, match=">= 1"):
        ThreadBudget(intra_op=0)
    assert ThreadBudget().spinning is False


def test_half_precision_and_tf32_are_gpu_only(tmp_path):
    """On a CPU device, fp16 is not used (it would be slower) and TF32 settings are left alone."""
    from models.runtime import TorchScriptRunner, configure_cuda_math

    module = torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.zeros(2, 4))
    module.save(str(tmp_path / "m.pt"))
    runner = TorchScriptRunner(tmp_path / "m.pt", torch.device("cpu"), half=True)
    assert runner.half is False and runner([torch.ones(3, 4)])[0].dtype == torch.float32
    before = torch.backends.cuda.matmul.allow_tf32
    configure_cuda_math(torch.device("cpu"), allow_tf32=not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_handler_config_checks_precision_and_tf32():
    from handlers.kinds.image import ClassifierConfig

    assert ClassifierConfig.from_mapping({"precision": "fp16", "allow_tf32": True}).precision == "fp16"
    with pytest.raises(ValueError, match="precision"):
        ClassifierConfig(precision="int8")
    with pytest.raises(ValueError, match="true or false"):
        ClassifierConfig(allow_tf32="yes")
    with pytest.raises(ValueError, match="positive integer"):
        ClassifierConfig(topk=True)
