"""Device policy and model backends, shared by the handlers, export verification and the benchmarks.

A runner takes a list of input arrays (batch first, NumPy on the host; a CPU torch tensor is taken too) and
returns a list of NumPy output arrays on the host. Four backends:
- ONNX Runtime: providers picked from what the host really has (asking for CUDA on a CPU-only host
  makes onnxruntime-gpu log errors), threads and spinning set on purpose (ORT's spinning threads
  otherwise starve PyTorch and other workers on the same cores); on a GPU, inputs are bound on the
  device with IO binding. It needs no torch: a worker of an ONNX model never imports it, which is what lets
  the CPU image leave torch and the CUDA libraries out (docs/deploy.md);
- TorchScript: torch.jit.load onto the worker's device; on a GPU, batches are copied from pinned
  memory with non_blocking=True;
- torch.export programs (torch.export.load, run as the module they unflatten to; verification and the bench);
- AOTInductor packages (aoti_load_package): native code compiled for one host's CPU instruction set (or GPU)
  and one torch; the export manifest beside the package records which, and loading anywhere else is refused
  with what to rebuild.
torch is imported by the backends that need it, when they load a model, never at import time; thread settings are
applied by the caller that owns the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import json
import platform
from contextlib import contextmanager

import numpy as np


@dataclass(frozen=True)
class Device:
    """Where a worker runs its model: "cpu", or "cuda" with the GPU's index. torch.device has the same two fields,
    so either may be passed where a device is taken."""

    type: str = "cpu"
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


CPU = Device("cpu")


class Runner(Protocol):
    device: Any

    def __call__(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def torch_available() -> bool:
    """Whether torch can be imported here (the CPU image has none; docs/deploy.md)."""
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def needs_torch(what: str):
    """torch, imported for `what`; where it is not installed, a RuntimeError that says which image has it."""
    try:
        import torch
    except ImportError:
        raise RuntimeError(f"{what} needs torch, which this environment lacks (the CPU image serves ONNX Runtime "
                           "models alone): serve it from the full image (make image VARIANT=cpu-torch, or cuda)"
                           ) from None
    return torch


def as_torch_device(device: Any):
    """A Device (or a torch.device) as a torch.device."""
    return needs_torch("this backend").device(str(device))


def cuda_usable() -> bool:
    """Whether a CUDA GPU can be used here: torch's answer where torch is installed; without torch (the CPU
    image), whether ONNX Runtime has its CUDA provider and the driver's device nodes are present."""
    if torch_available():
        import torch

        return torch.cuda.is_available()
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidiactl").exists()


def select_device(gpu_id: int | str | None, *, cuda_available: bool | None = None) -> Device:
    """The worker's device: cuda:<gpu_id> when TorchServe assigned a GPU and CUDA is usable, else CPU. No GPU
    assigned, nothing is imported to find out."""
    if gpu_id is None or gpu_id == "":
        return CPU
    if cuda_available is None:
        cuda_available = cuda_usable()
    return Device("cuda", int(gpu_id)) if cuda_available else CPU


def ort_providers(device: Any, available: Sequence[str] | None = None) -> list:
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
        """Set PyTorch's process-wide thread pools; call once from the process that owns them. Where torch is not
        imported yet, the worker does not use it: nothing to set (and torch is not imported for it)."""
        import sys

        torch = sys.modules.get("torch")
        if torch is None:
            return
        torch.set_num_threads(self.intra_op)
        try:
            torch.set_num_interop_threads(self.inter_op)
        except RuntimeError:
            pass  # already fixed once parallel work has run in this process; intra-op is what matters


def configure_cuda_math(device: Any, *, allow_tf32: bool) -> None:
    """TF32 for CUDA matmuls and convolutions, off unless asked for (fp32 parity depends on it).
    Process-wide: call from the worker that owns the process, never at import. Only torch's: ONNX Runtime's CUDA
    provider uses no TF32 unless its session asks for it."""
    if device.type == "cuda" and torch_available():
        import torch

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

    def __init__(self, path: Path, device: Any, threads: ThreadBudget, *, half: bool = False) -> None:
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

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"model takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        arrays = [np.ascontiguousarray(host_array(t)) for t in inputs]
        if self.on_gpu:
            return self._run_bound(arrays)
        return self.session.run(self.output_names, dict(zip(self.input_names, arrays)))

    def _run_bound(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """GPU path: inputs copied to the device once and bound there (ORT's own OrtValues, no torch); outputs are
        copied to the host once."""
        import onnxruntime as ort

        index = self.device.index or 0
        binding = self.session.io_binding()
        on_device = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", index) for a in arrays]  # alive until the run ends
        for name, value in zip(self.input_names, on_device):
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()


def host_array(value: Any) -> np.ndarray:
    """An input as a NumPy array on the host: a NumPy array as it is, a torch tensor (verification and the bench
    pass them) through its host copy."""
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    return detach().cpu().numpy() if detach is not None else np.asarray(value)


def _as_tensors(inputs: Sequence[Any], device) -> list:
    """Inputs as C-contiguous torch tensors on `device` (from pinned memory, non_blocking, on a GPU)."""
    import torch

    tensors = [torch.as_tensor(np.ascontiguousarray(host_array(t))) for t in inputs]  # AOTInductor reads C order
    if device.type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return tensors


def _outputs(out) -> list[np.ndarray]:
    """A module's output (a tensor, or a tuple or list of them) as host NumPy arrays, fp16 as fp32."""
    outputs = out if isinstance(out, (tuple, list)) else [out]
    return [(o.float() if o.is_floating_point() else o).cpu().numpy() for o in outputs]


class ModuleRunner:
    """An eager torch module as a runner (the reference that verification, the evaluation and the bench hold the
    exports to): NumPy (or torch) inputs onto `device`, NumPy outputs back, under inference_mode."""

    def __init__(self, module: Any, device: Any = CPU) -> None:
        self.device = as_torch_device(device)
        self.module = module.to(self.device)

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return _outputs(self.module(*_as_tensors(inputs, self.device)))


class TorchScriptRunner:
    """A TorchScript module on the worker's device, run under inference_mode.
    `half`: on a CUDA device, weights and floating inputs are fp16; outputs come back fp32."""

    def __init__(self, path: Path, device: Any, *, half: bool = False) -> None:
        torch = needs_torch(f"{Path(path).name} (TorchScript)")
        self.device = as_torch_device(device)
        self.half = half and self.device.type == "cuda"
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        if self.half:
            self.module = self.module.half()

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            tensors = _as_tensors(inputs, self.device)
            if self.half:
                tensors = [t.half() if t.is_floating_point() else t for t in tensors]
            return _outputs(self.module(*tensors))  # fp16 comes back fp32


class ProgramRunner(ModuleRunner):
    """A torch.export program, unflattened to a module and run eagerly (on the CPU, or the worker's GPU)."""

    def __init__(self, path: Path, device: Any) -> None:
        torch = needs_torch(f"{Path(path).name} (a torch.export program)")
        super().__init__(torch.export.load(str(path)).module(), device)


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


def aoti_build_host(device: Any) -> dict:
    """What an AOTInductor package compiled here is bound to: this torch, this machine type and, for a CPU
    package, the -march it was compiled with and this CPU's extensions; for a CUDA package, the GPU's compute
    capability and the CUDA version."""
    torch = needs_torch("an AOTInductor package")
    device = as_torch_device(device)
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
    torch = needs_torch("an AOTInductor package")
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

    def __init__(self, path: Path, device: Any, built_for: dict | None, *, model: str = "MODEL") -> None:
        torch = needs_torch(f"{Path(path).name} (an AOTInductor package)")
        device = as_torch_device(device)
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

    def __call__(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            return _outputs(self.model(*_as_tensors(inputs, self.device)))


def built_for(path: Path) -> tuple[str, dict | None]:
    """(model name, build-host record) of an artifact, from the export manifest that lies beside it (in its export
    folder and in its .mar alike); ("MODEL", None) when there is no such record."""
    manifest_path = path.parent / "manifest.json"
    if not manifest_path.exists():
        return "MODEL", None
    manifest = json.loads(manifest_path.read_text())
    entry = next((e for e in manifest.get("artifacts", {}).values() if e.get("file") == path.name), {})
    return manifest.get("model", "MODEL"), entry.get("built_for")


def load_runner(path: Path, device: Any, threads: ThreadBudget, *, half: bool = False) -> Runner:
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
