"""CUDA paths of the runtime (TorchScript on cuda:<gpu_id>, ONNX Runtime's CUDA provider with IO binding).
This tier skips, visibly (pytest -ra lists the reason), on hosts without CUDA."""

from __future__ import annotations

import pytest
import torch

from handlers.runtime import OrtRunner, ThreadBudget, TorchScriptRunner, select_device
from tests.conftest import ROOT, SERVED, built

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")]


@pytest.mark.parametrize("spec", SERVED, ids=lambda s: s.name)
@pytest.mark.parametrize("artifact", ["model.trace.pt", "model.onnx"])
def test_gpu_backend_matches_cpu(spec, artifact):
    path = built(ROOT / "artifacts" / spec.name / artifact)
    device = select_device(0)
    assert device.type == "cuda"
    batch = torch.randn((7, *spec.inputs[0].example_shape[1:]))
    cls = OrtRunner if artifact.endswith(".onnx") else TorchScriptRunner
    args = (ThreadBudget(),) if cls is OrtRunner else ()
    gpu_runner, cpu_runner = cls(path, device, *args), cls(path, torch.device("cpu"), *args)
    if cls is OrtRunner:
        assert gpu_runner.on_gpu, "CUDAExecutionProvider was not used"
    assert torch.allclose(gpu_runner([batch])[0], cpu_runner([batch])[0], atol=1e-3)
