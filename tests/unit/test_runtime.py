"""Device policy and backend selection, for both the CPU and the GPU case, on any host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.runtime import (AotiRunner, HostMismatch, ThreadBudget, aoti_build_host, aoti_host_problems, cpu_isa,
                            ort_providers, select_device)


@pytest.mark.parametrize("gpu_id, cuda, expected", [
    (None, True, "cpu"),
    (0, False, "cpu"),
    ("", True, "cpu"),
    (0, True, "cuda:0"),
    (3, True, "cuda:3"),
    ("1", True, "cuda:1"),
])
def test_device_follows_the_workers_gpu_id_only_when_cuda_is_usable(gpu_id, cuda, expected):
    assert str(select_device(gpu_id, cuda_available=cuda)) == expected


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
    assert runner.half is False and runner([torch.ones(3, 4)])[0].dtype == np.float32
    before = torch.backends.cuda.matmul.allow_tf32
    configure_cuda_math(torch.device("cpu"), allow_tf32=not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_handler_config_checks_precision_and_tf32():
    from handlers.kinds.classify import ClassifierConfig

    assert ClassifierConfig.from_mapping({"precision": "fp16", "allow_tf32": True}).precision == "fp16"
    with pytest.raises(ValueError, match="precision"):
        ClassifierConfig(precision="int8")
    with pytest.raises(ValueError, match="true or false"):
        ClassifierConfig(allow_tf32="yes")
    with pytest.raises(ValueError, match="positive integer"):
        ClassifierConfig(topk=True)


X86_CPUINFO = """processor\t: 0
model name\t: Some CPU
flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 hypervisor avx512f
"""


def test_cpu_isa_keeps_the_instruction_set_extensions_of_x86_and_arm():
    assert cpu_isa(X86_CPUINFO) == ["avx", "avx2", "avx512f", "bmi1", "bmi2", "f16c", "fma", "popcnt", "sse", "sse2",
                                    "sse4_1", "sse4_2", "ssse3"]
    assert cpu_isa("processor : 0\nFeatures : fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp sve\n") == [
        "aes", "asimd", "asimddp", "sha1", "sha2", "sve"]
    assert cpu_isa("no such lines\n") == []


def test_an_aoti_package_is_refused_on_a_host_it_was_not_compiled_for():
    here = aoti_build_host(torch.device("cpu"))
    assert here["device"] == "cpu" and here["march"] == "native" and here["torch"] == torch.__version__
    assert aoti_host_problems(here) == []
    older = aoti_host_problems({**here, "torch": "2.13.0"})
    assert older == [f"it was compiled by torch 2.13.0, this is torch {torch.__version__}"]
    wider = aoti_host_problems({**here, "isa": ["avx", "avx512f", "amx_tile"]}, isa=["avx", "avx2"])
    assert wider == ["it was compiled with -march=native on a CPU with amx_tile, avx512f, which this CPU lacks"]
    # a portable -march (config.cpp.march) does not tie the package to the build CPU's extensions
    assert aoti_host_problems({**here, "march": "x86-64-v2", "isa": ["amx_tile"]}, isa=[]) == []
    gpu = {**here, "device": "cuda", "capability": "sm_90"}
    assert aoti_host_problems(gpu, cuda_capability="sm_80") == [
        "it was compiled for a CUDA GPU of sm_90, this host has sm_80"]
    assert aoti_host_problems(gpu, cuda_capability="sm_90") == []


def test_the_aoti_runner_says_what_to_rebuild(tmp_path):
    package = tmp_path / "model.aoti.pt2"
    package.write_bytes(b"never opened")
    with pytest.raises(HostMismatch, match=r"no record of the host.*`make export verify archive MODEL=digits`"):
        AotiRunner(package, torch.device("cpu"), None, model="digits")
    moved = {**aoti_build_host(torch.device("cpu")), "torch": "2.99.0"}
    with pytest.raises(HostMismatch, match=r"cannot run on this host: it was compiled by torch 2\.99\.0.*rebuild it on "
                                           r"this host: `make export verify archive MODEL=digits`"):
        AotiRunner(package, torch.device("cpu"), moved, model="digits")
