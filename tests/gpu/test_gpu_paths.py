"""CUDA paths of the runtime: TorchScript on cuda:<gpu_id> from pinned memory, ONNX Runtime's CUDA provider
with IO binding, fp16 on GPU within fp16 tolerances, TF32 off unless configured.
This tier skips, visibly (pytest -ra lists the reason), on hosts without CUDA; ONNX Runtime tests also skip,
visibly, where the installed onnxruntime has no CUDA provider."""

from __future__ import annotations

import pytest
import torch

from export.verify import held_out_inputs
from models.runtime import OrtRunner, ThreadBudget, TorchScriptRunner, configure_cuda_math, select_device
from models import checkpoint
from tests.conftest import CLASSIFIERS, EMBEDDERS, TREE, SERVED, built

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host")]
ARTIFACTS = ["model.trace.pt", "model.script.pt", "model.onnx"]
# fp16 logits against fp32 eager: about 1e-2 absolute per the issue, scaled by the logits' own range
FP16_ATOL, FP16_TOP1 = 1e-2, 0.99


def as_tensors(runner):
    """A runner's NumPy outputs as CPU tensors, beside eager's."""
    return lambda inputs: [torch.from_numpy(o) for o in runner(inputs)]


def runner_for(path, device, *, half=False):
    """The artifact's serving runner on `device`, its outputs as CPU tensors."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider (install onnxruntime-gpu)")
        runner = OrtRunner(path, device, ThreadBudget(), half=half)
        assert runner.on_gpu and runner.half == half, "the CUDA provider was not used"
        return as_tensors(runner)
    return as_tensors(TorchScriptRunner(path, device, half=half))


def real_batch(spec, n=64):
    images, labels = held_out_inputs(spec)
    return images[:n], labels[:n]


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_gpu_backend_matches_eager_fp32(spec, artifact):
    configure_cuda_math(torch.device("cuda", 0), allow_tf32=False)
    path = built(TREE.artifacts(spec.name) / artifact)
    device = select_device(0)
    assert str(device) == "cuda:0"
    batch, _ = real_batch(spec)
    model, _ = checkpoint.load(TREE.checkpoint(spec.name))
    with torch.inference_mode():
        expected = model(batch)
    got = runner_for(path, device)([batch])[0]
    assert got.device.type == "cpu" and got.dtype == torch.float32
    # cuDNN's fp32 convolutions sum in another order than the CPU's: within atol + 1e-3 relative, same top-1
    torch.testing.assert_close(got, expected, atol=spec.tolerance.atol, rtol=1e-3)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
@pytest.mark.parametrize("artifact", ["model.trace.pt", "model.onnx"])
def test_fp16_on_gpu_is_within_fp16_tolerance(spec, artifact):
    path = built(TREE.artifacts(spec.name) / artifact)
    batch, _ = real_batch(spec)
    model, _ = checkpoint.load(TREE.checkpoint(spec.name))
    with torch.inference_mode():
        expected = model(batch)
    got = runner_for(path, select_device(0), half=True)([batch])[0]
    scale = max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
    assert diff <= FP16_ATOL * scale, f"max abs diff {diff:.3g} > {FP16_ATOL} x logit range {scale:.1f}"
    assert agreement >= FP16_TOP1, f"top-1 agreement {agreement:.3f}"


@pytest.mark.parametrize("spec", EMBEDDERS, ids=lambda s: s.name)
@pytest.mark.parametrize("artifact", ["model.trace.pt", "model.onnx"])
def test_embedder_on_gpu_matches_sentence_transformers(spec, artifact):
    from export.verify import check_cases, eager_reference, judge

    configure_cuda_math(torch.device("cuda", 0), allow_tf32=False)
    runner = runner_for(built(TREE.artifacts(spec.name) / artifact), select_device(0))
    checks = check_cases(spec, eager_reference(spec, None), runner)["checks"]
    assert judge(spec, "onnx" if artifact.endswith(".onnx") else "trace", {"artifact": artifact, "checks": checks,
                                                                           "top1_agreement": None}) == []


def test_tf32_follows_the_model_config():
    device = torch.device("cuda", 0)
    configure_cuda_math(device, allow_tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_cuda_math(device, allow_tf32=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_every_visible_gpu_gets_its_own_worker_device():
    """TorchServe hands worker k gpu_id k mod n; each worker's model lands on that GPU."""
    path = built(TREE.artifacts(SERVED[0].name) / "model.trace.pt")
    for gpu_id in range(torch.cuda.device_count()):
        runner = TorchScriptRunner(path, select_device(str(gpu_id)))
        assert {p.device for p in runner.module.parameters()} == {torch.device("cuda", gpu_id)}


@pytest.mark.parametrize("spec", CLASSIFIERS, ids=lambda s: s.name)
def test_aoti_compiles_for_the_gpu_and_runs_on_the_workers_device(spec, tmp_path):
    """On a CUDA host export compiles the AOTInductor package for the GPU and records its compute capability; the
    runner runs it on the worker's device and hands back CPU tensors matching eager."""
    from export.export import export_aoti, export_program
    from models.runtime import AotiRunner, aoti_host_problems

    configure_cuda_math(torch.device("cuda", 0), allow_tf32=False)
    model, _ = checkpoint.load(built(TREE.checkpoint(spec.name)))
    export_program(model, spec, tmp_path / "model.program.pt2")
    record = export_aoti(model, spec, tmp_path / "model.aoti.pt2")["built_for"]
    assert record["device"] == "cuda" and record["capability"].startswith("sm_") and aoti_host_problems(record) == []
    runner = AotiRunner(tmp_path / "model.aoti.pt2", torch.device("cuda", 0), record, model=spec.name)
    assert runner.device == torch.device("cuda", 0)
    batch, _ = real_batch(spec)
    with torch.inference_mode():
        expected = model.cpu()(batch)
    got = as_tensors(runner)([batch])[0]
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=spec.tolerance.atol, rtol=1e-3)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_the_chat_decoder_compiles_for_the_gpu_and_keeps_greedy_parity_there(tmp_path):
    """export/decoder.py on a GPU host: the program and a CUDA AOTInductor package, each greedy-token-identical to
    the eager decoder on the same GPU in a fresh process, and the scheduler serving the package on the GPU."""
    import json
    import subprocess
    import sys

    from handlers.kinds import generate
    from models.paths import ROOT

    checkpoint = built(TREE.checkpoint("chat-tiny") / "model.json").parent
    out = tmp_path / "chat-tiny"
    proc = subprocess.run([sys.executable, "-m", "export.decoder", "--checkpoint", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "640/640 greedy tokens identical" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["artifacts"]["aoti"]["built_for"]["device"] == "cuda"
    sched = generate.build(out, generate.Settings(backend="aoti"), served_as=("chat-tiny", "1"), max_batch=4,
                           device=torch.device("cuda", 0))
    assert sched.device.type == "cuda" and sched.cache.k[0].device.type == "cuda"

