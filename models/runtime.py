"""Device policy and model backends, shared by the handlers, export verification and the benchmarks.

A runner takes a list of input tensors (batch first, on the CPU) and returns a list of output tensors
on the CPU. Four backends:
- ONNX Runtime: providers picked from what the host really has (asking for CUDA on a CPU-only host
  makes onnxruntime-gpu log errors), threads and spinning set on purpose (ORT's spinning threads
  otherwise starve PyTorch and other workers on the same cores); on a GPU, inputs are bound on the
  device with IO binding;
- TorchScript: torch.jit.load onto the worker's device; on a GPU, batches are copied from pinned
  memory with non_blocking=True;
- torch.export programs (torch.export.load, run as the module they unflatten to; verification and the bench);
- AOTInductor packages (aoti_load_package): native code compiled for one host's CPU instruction set (or GPU)
  and one torch; the export manifest beside the package records which, and loading anywhere else is refused
  with what to rebuild.
Nothing here runs at import time; thread settings are applied by the caller that owns the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import json
import platform
from contextlib import contextmanager

import numpy as np
import torch


class Runner(Protocol):
    device: torch.device

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


def select_device(gpu_id: int | str | None, *, cuda_available: bool | None = None) -> torch.device:
    """The worker's device: cuda:<gpu_id> when TorchServe assigned a GPU and CUDA is usable, else CPU."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if gpu_id is None or gpu_id == "" or not cuda_available:
        return torch.device("cpu")
    return torch.device("cuda", int(gpu_id))


def ort_providers(device: torch.device, available: Sequence[str] | None = None) -> list:
    """ORT execution providers for `device`: CUDA with its device_id only on a CUDA device, else CPU alone."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class ThreadBudget:
    """Threads one worker may use. `intra_op` is the parallelism of one forward pass; spinning is off
    by default so idle ORT threads do not burn the cores other workers and the frontend need."""

    intra_op: int = 1
    inter_op: int = 1
    spinning: bool = False

    def __post_init__(self) -> None:
        if self.intra_op < 1 or self.inter_op < 1:
            raise ValueError(f"thread counts must be >= 1, got intra_op={self.intra_op} inter_op={self.inter_op}")

    def apply_to_torch(self) -> None:
        """Set PyTorch's process-wide thread pools; call once from the process that owns them."""
        torch.set_num_threads(self.intra_op)
        try:
            torch.set_num_interop_threads(self.inter_op)
        except RuntimeError:
            pass  # already fixed once parallel work has run in this process; intra-op is what matters


def configure_cuda_math(device: torch.device, *, allow_tf32: bool) -> None:
    """TF32 for CUDA matmuls and convolutions, off unless asked for (fp32 parity depends on it).
    Process-wide: call from the worker that owns the process, never at import."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32


def half_onnx(path: Path) -> bytes:
    """An fp16 copy of an fp32 ONNX model, inputs and outputs kept fp32 (the handler's tensors stay as they are)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load(str(path)), keep_io_types=True).SerializeToString()


class OrtRunner:
    """An ONNX Runtime session with explicit threading and host-appropriate providers.
    `half`: on a CUDA device, the session runs an fp16 conversion of the model."""

    def __init__(self, path: Path, device: torch.device, threads: ThreadBudget, *, half: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads.intra_op
        options.inter_op_num_threads = threads.inter_op
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if threads.spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if device.type == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels the installed PyTorch brought
        self.device = device
        providers = ort_providers(device)
        self.half = half and providers[0] != "CPUExecutionProvider"  # fp16 only where the CUDA provider leads
        model = half_onnx(path) if self.half else str(path)
        self.session = ort.InferenceSession(model, options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.on_gpu = device.type == "cuda" and "CUDAExecutionProvider" in self.session.get_providers()

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"model takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        if self.on_gpu:
            return self._run_bound(inputs)
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(out) for out in self.session.run(self.output_names, feeds)]

    def _run_bound(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """GPU path: inputs stay on the device (bound by pointer); outputs are copied to the host once."""
        binding = self.session.io_binding()
        on_device = [t.pin_memory().to(self.device, non_blocking=True).contiguous() for t in inputs]
        torch.cuda.current_stream(self.device).synchronize()
        for name, tensor in zip(self.input_names, on_device):
            binding.bind_input(name, "cuda", self.device.index or 0, _NUMPY_DTYPES[tensor.dtype], list(tensor.shape),
                               tensor.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return [torch.from_numpy(out) for out in binding.copy_outputs_to_cpu()]


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
                 torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


class TorchScriptRunner:
    """A TorchScript module on the worker's device, run under inference_mode.
    `half`: on a CUDA device, weights and floating inputs are fp16; outputs come back fp32."""

    def __init__(self, path: Path, device: torch.device, *, half: bool = False) -> None:
        self.device = device
        self.half = half and device.type == "cuda"
        self.module = torch.jit.load(str(path), map_location=device).eval()
        if self.half:
            self.module = self.module.half()

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                inputs = [t.pin_memory().to(self.device, non_blocking=True) for t in inputs]
                if self.half:
                    inputs = [t.half() if t.is_floating_point() else t for t in inputs]
            out = self.module(*inputs)
        outputs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [(o.float() if o.is_floating_point() else o).cpu() for o in outputs]  # fp16 comes back fp32


def _outputs(out) -> list[torch.Tensor]:
    return [o.cpu() for o in (out if isinstance(out, (tuple, list)) else [out])]


class ProgramRunner:
    """A torch.export program, unflattened to a module and run eagerly (on the CPU, or the worker's GPU)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self.device = device
        self.module = torch.export.load(str(path)).module().to(device)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return _outputs(self.module(*(t.to(self.device) for t in inputs)))


# /proc/cpuinfo flags naming instruction-set extensions that code compiled with -march=native may use.
_ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "amx", "popcnt", "abm", "lzcnt", "movbe", "adx", "aes",
                 "pclmul", "vpclmul", "vaes", "sha", "gfni", "cx16", "asimd", "sve", "fp16", "bf16", "i8mm", "dotprod")


def cpu_isa(cpuinfo: str | None = None) -> list[str]:
    """This CPU's instruction-set extensions, from /proc/cpuinfo (x86 `flags`, Arm `Features`); [] if unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted(flag for flag in value.split() if flag.startswith(_ISA_PREFIXES))
    return []


def aoti_build_host(device: torch.device) -> dict:
    """What an AOTInductor package compiled here is bound to: this torch, this machine type and, for a CPU
    package, the -march it was compiled with and this CPU's extensions; for a CUDA package, the GPU's compute
    capability and the CUDA version."""
    record = {"torch": torch.__version__, "machine": platform.machine(), "device": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {**record, "capability": f"sm_{major}{minor}", "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name(device)}
    from torch._inductor import config

    return {**record, "march": config.cpp.march or "native", "isa": cpu_isa()}


def aoti_host_problems(built_for: dict, *, isa: Sequence[str] | None = None, cuda_capability: str | None = None) -> list[str]:
    """Every way this host differs from what a package was compiled for (empty: it may load here). `isa` and
    `cuda_capability` stand for this host's (read from it when None)."""
    problems = []
    if built_for.get("torch") != torch.__version__:
        problems.append(f"it was compiled by torch {built_for.get('torch')}, this is torch {torch.__version__}")
    if built_for.get("machine") != platform.machine():
        problems.append(f"it was compiled for {built_for.get('machine')}, this host is {platform.machine()}")
    if built_for.get("device") == "cuda":
        if cuda_capability is None and torch.cuda.is_available():
            cuda_capability = "sm_%d%d" % torch.cuda.get_device_capability()
        if cuda_capability != built_for.get("capability"):
            problems.append(f"it was compiled for a CUDA GPU of {built_for.get('capability')}, this host has "
                            f"{cuda_capability or 'no CUDA GPU'}")
    elif built_for.get("march") == "native":
        missing = sorted(set(built_for.get("isa", ())) - set(cpu_isa() if isa is None else isa))
        if missing:
            problems.append(f"it was compiled with -march=native on a CPU with {', '.join(missing)}, which this CPU "
                            "lacks")
    return problems


@contextmanager
def quiet_cpp_extension():
    """torch.utils.cpp_extension, imported by AOTInductor, warns on every CPU-only host that it found no CUDA
    runtime: true, and no fault of anyone's, so it is kept out of the export's and the worker's logs."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class HostMismatch(RuntimeError):
    """An AOTInductor package compiled for another host (CPU instruction set, GPU or torch version)."""


class AotiRunner:
    """An AOTInductor package: a CPU package runs on the CPU whatever the worker's device; a CUDA package on the
    worker's GPU. `built_for` is the manifest's record of its build host (models.runtime.aoti_build_host)."""

    def __init__(self, path: Path, device: torch.device, built_for: dict | None, *, model: str = "MODEL") -> None:
        rebuild = (f"rebuild it on this host: `make export verify archive MODEL={model}` (or run it where it was "
                   "built)")
        if built_for is None:
            raise HostMismatch(f"{path.name} has no record of the host it was compiled for; {rebuild}")
        problems = aoti_host_problems(built_for)
        if problems:
            raise HostMismatch(f"{path.name} cannot run on this host: {'; '.join(problems)}; {rebuild}")
        from torch._inductor import aoti_load_package

        self.device = torch.device("cpu") if built_for["device"] == "cpu" else \
            (device if device.type == "cuda" else torch.device("cuda", 0))
        with quiet_cpp_extension():
            self.model = aoti_load_package(str(path),
                                           device_index=self.device.index if self.device.type == "cuda" else -1)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            if self.device.type == "cuda":
                inputs = [t.pin_memory().to(self.device, non_blocking=True) for t in inputs]
            return _outputs(self.model(*inputs))


def built_for(path: Path) -> tuple[str, dict | None]:
    """(model name, build-host record) of an artifact, from the export manifest that lies beside it (in its export
    folder and in its .mar alike); ("MODEL", None) when there is no such record."""
    manifest_path = path.parent / "manifest.json"
    if not manifest_path.exists():
        return "MODEL", None
    manifest = json.loads(manifest_path.read_text())
    entry = next((e for e in manifest.get("artifacts", {}).values() if e.get("file") == path.name), {})
    return manifest.get("model", "MODEL"), entry.get("built_for")


def load_runner(path: Path, device: torch.device, threads: ThreadBudget, *, half: bool = False) -> Runner:
    """Pick the backend from the artifact's file type (.onnx -> ONNX Runtime, .pt -> TorchScript, .aoti.pt2 ->
    AOTInductor, .pt2 -> torch.export program). `half` asks for fp16 inference, honoured on a CUDA device by the
    ONNX Runtime and TorchScript backends (an AOTInductor package runs in the precision it was compiled in)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OrtRunner(path, device, threads, half=half)
    if path.suffix == ".pt":
        return TorchScriptRunner(path, device, half=half)
    if path.name.endswith(".aoti.pt2"):
        model, record = built_for(path)
        return AotiRunner(path, device, record, model=model)
    if path.suffix == ".pt2":
        return ProgramRunner(path, device)
    raise ValueError(f"no backend for {path.name}: expected .onnx, TorchScript .pt, torch.export .pt2 or an "
                     "AOTInductor .aoti.pt2")
