"""Where models run and in what precision: device, autocast precision and loader worker count.

Each choice is a pure function of the request and the machine's capabilities (`choose_*`), so it is tested on any
machine; `resolve_*` asks torch and os for those capabilities.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from pipeline_lib.core.config import DEVICE_PATTERN

log = logging.getLogger(__name__)

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_GPU_WORKERS = 8  # loader workers that feed a GPU (they only read the tensor cache when augmenting on the GPU)
MAX_CPU_WORKERS = 4  # on a CPU the model step is the bottleneck: workers would take cores from it


def check_device(device: str) -> str:
    """device if it reads auto, cpu, mps, cuda or cuda:N; ValueError naming the accepted forms otherwise."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def choose_device(requested: str, cuda_count: int, mps_available: bool) -> str:
    """The device to use: auto prefers cuda, then mps, then cpu; an unavailable device is a RuntimeError."""
    check_device(requested)
    if requested == "auto":
        return "cuda" if cuda_count > 0 else "mps" if mps_available else "cpu"
    if requested.startswith("cuda"):
        if cuda_count == 0:
            raise RuntimeError(f"device is {requested!r} but no CUDA device is available (use auto or cpu)")
        index = int(requested.partition(":")[2] or 0)
        if index >= cuda_count:
            raise RuntimeError(f"device is {requested!r} but there are only {cuda_count} CUDA device(s) (0..)")
    if requested == "mps" and not mps_available:
        raise RuntimeError("device is 'mps' but Apple's MPS backend is not available here (use auto or cpu)")
    return requested


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(requested: str) -> str:
    """choose_device with this machine's CUDA device count and MPS availability."""
    check_device(requested)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return choose_device(requested, cuda_count, _mps_available())


def device_type(device: str) -> str:
    """'cuda' for cuda and cuda:N, else the device itself (cpu, mps)."""
    return torch.device(device).type


def is_cuda(device: str) -> bool:
    """True for cuda and cuda:N."""
    return device_type(device) == "cuda"


def choose_precision(requested: str, kind: str, bf16_supported: bool) -> str:
    """bf16, fp16 or fp32 for a device type (cpu, cuda, mps).

    auto: bf16 on a CUDA GPU that supports it, fp16 (with a gradient scaler) on other CUDA GPUs, fp32 on CPU and MPS.
    Explicit choices are checked: bf16 needs a GPU with bf16 (or the CPU), fp16 needs CUDA, MPS trains in fp32.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp32":
        return requested
    if kind == "mps":
        raise ValueError(f"precision {requested} is not supported on mps here; use fp32 or auto")
    if requested == "fp16" and kind != "cuda":
        raise ValueError("precision fp16 needs a CUDA GPU (it trains with a gradient scaler); use fp32 or bf16")
    if requested == "bf16" and kind == "cuda" and not bf16_supported:
        raise ValueError("this CUDA GPU has no native bf16 (needs compute capability 8.0+); use fp16 or auto")
    return requested


def _bf16_supported(device: str) -> bool:
    """Native bf16 on this CUDA device (Ampere and newer; emulation does not count)."""
    if device_type(device) != "cuda":
        return False
    with torch.cuda.device(torch.device(device)):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def resolve_precision(requested: str, device: str) -> str:
    """choose_precision for a resolved device, asking the GPU whether it has bf16."""
    return choose_precision(requested, device_type(device), _bf16_supported(device))


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the precision's dtype on the device, or nothing for fp32 (keeps CPU runs bitwise reproducible)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type(device), dtype=dtype)


def grad_scaler(device: str, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 (its small range underflows gradients), None otherwise."""
    return torch.amp.GradScaler(device_type(device)) if precision == "fp16" else None


def choose_num_workers(requested: int | str, cpu_count: int, kind: str) -> int:
    """DataLoader workers: a number as given; auto = min(8, CPUs - 1) feeding a GPU, min(4, CPUs // 4) on a CPU."""
    if requested != "auto":
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
            raise ValueError(f"num_workers must be 'auto' or an integer >= 0, got {requested!r}")
        return requested
    if kind in ("cuda", "mps"):
        return max(0, min(MAX_GPU_WORKERS, cpu_count - 1))
    return max(0, min(MAX_CPU_WORKERS, cpu_count // 4))


def usable_cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where there is one, e.g. in a container)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def resolve_num_workers(requested: int | str, device: str) -> int:
    """choose_num_workers with this machine's usable CPU count."""
    workers = choose_num_workers(requested, usable_cpu_count(), device_type(device))
    if requested == "auto":
        log.info("num_workers auto: %d loader workers for %s (%d CPUs)", workers, device, usable_cpu_count())
    return workers
