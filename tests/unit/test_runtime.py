"""Device policy and backend selection, for both the CPU and the GPU case, on any host."""

from __future__ import annotations

import pytest
import torch

from handlers.runtime import ThreadBudget, ort_providers, select_device


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
