"""Speed settings that depend on the machine: precision, memory format, torch.compile and how
the C allocator treats freed memory.

The same network trains about 3x faster on a CPU with native bf16 (AVX512-BF16/AMX) or on an
Ampere+ GPU when it runs in bf16 autocast with channels_last activations; users should get that
without knowing it, and keep the last word through explicit values.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

AUTO = "auto"
# Lightning's spellings; "auto" is ours and is resolved before the Trainer sees it.
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "64-true", "64",
              "16-true", "bf16-true", "transformer-engine")


def device_type(accelerator: str | None) -> str:
    """The torch device type an accelerator setting (cpu, gpu, cuda, mps, auto) will run on."""
    accelerator = (accelerator or AUTO).lower()
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "mps":
        return "mps"
    if accelerator == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
    return "cpu"


# The x86 features behind a native bf16 dot product, as Linux spells them in /proc/cpuinfo.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# torch's own probes: private (torch.cpu._is_*), so only a fallback where /proc/cpuinfo is absent.
_TORCH_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the Linux kernel reports (x86 `flags`, Arm `Features`), or None
    where there is no such file (macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def cpu_bf16_support() -> tuple[bool | None, str]:
    """(whether the CPU has native bf16, where that answer came from); None when no source could tell.

    The kernel's flag list is public and stable; torch's probes are private helpers that a torch
    release may rename or drop, so they are asked only where there is no flag list. The public
    torch.backends.cpu.get_cpu_capability() cannot tell: it says "AVX512" on an AMX-BF16 Xeon too.
    """
    flags = cpu_flags()
    if flags is not None:
        return any(f in flags for f in BF16_CPU_FLAGS), "/proc/cpuinfo"
    probes = [getattr(torch.cpu, name, None) for name in _TORCH_BF16_PROBES]
    if all(callable(p) for p in probes):
        return any(bool(p()) for p in probes), "torch.cpu"
    return None, "no /proc/cpuinfo and no torch.cpu bf16 probe (" + ", ".join(_TORCH_BF16_PROBES) + ")"


def cpu_has_fast_bf16() -> bool | None:
    """Native bf16 dot products (AVX512-BF16 or AMX): there bf16 autocast beats fp32 ~2.5x.

    Without them PyTorch emulates bf16 and mixed precision is slower than fp32. None: could not tell.
    """
    return cpu_bf16_support()[0]


def best_precision(device: str) -> tuple[str, str]:
    """The fastest precision that keeps accuracy on `device`, with the reason for the choice."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return "32-true", "no CUDA device visible"
        major, minor = torch.cuda.get_device_capability()
        if major >= 8 and torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"GPU compute capability {major}.{minor} has bf16 tensor cores"
        return "16-mixed", f"GPU compute capability {major}.{minor}: fp16 with loss scaling"
    if device == "cpu":
        fast = cpu_has_fast_bf16()
        if fast is None:
            log.warning(
                "trainer.precision=auto: cannot tell whether this CPU has native bf16 (%s); using "
                "32-true, which may be ~2.5x slower. Set trainer.precision=bf16-mixed if it has "
                "AVX512-BF16 or AMX", cpu_bf16_support()[1],
            )
            return "32-true", "could not detect native bf16 on this CPU"
        if fast:
            return "bf16-mixed", "CPU has native bf16 (AVX512-BF16/AMX)"
        return "32-true", "CPU has no native bf16"
    return "32-true", f"no measured fast path on {device}"


def resolve_precision(precision: str | int | None, accelerator: str | None) -> tuple[str, str]:
    """`auto` (or null) becomes the best precision for the accelerator; anything else is kept."""
    value = AUTO if precision is None else str(precision)
    if value not in PRECISIONS:
        raise FinetuneError(
            f"unknown trainer.precision={value}; use auto, 32-true, 16-mixed or bf16-mixed"
        )
    if value != AUTO:
        return value, "set explicitly"
    return best_precision(device_type(accelerator))


def is_convolutional(module: nn.Module) -> bool:
    """More than one 2-D convolution: a CNN (ResNet, EfficientNet, ConvNeXt), not a ViT whose
    only convolution is the patch embedding and which gains nothing from channels_last."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot run here, or None when it can."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        return f"torch.compile is not supported on Python {sys.version_info.major}.{sys.version_info.minor} / this torch build"
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed (pip install triton)"
    elif device == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++", "cl")):
        return "no C++ compiler on PATH (install g++ or clang)"
    return None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def reuse_freed_memory() -> bool:
    """Keep freed heap memory in the process instead of handing it back to the kernel (glibc).

    A training step frees and reallocates the same 10-100 MB activation buffers every step. By
    default glibc serves blocks that big with mmap and unmaps them on free, so every step
    page-faults and zero-fills them again. In a plain bf16 ResNet-18 loop at 224 on 2 cores that
    was ~95,000 faults and a sixth of the step; under the Trainer, benchmarks/throughput.py
    measures 2-8%. The same remedy as LD_PRELOAD=libjemalloc in Intel's CPU tuning guides,
    without a library to install. The cost: resident memory stays at its peak.
    Returns whether it took effect (False off glibc, e.g. macOS or musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mmap for big blocks (they come from the heap) and never trim the heap's top.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
