"""Mixed precision: the dtype convolutions run in, chosen for the device.

bf16 autocast halves the memory traffic of activations and runs on matrix
units where the hardware has them (CUDA tensor cores, Intel AMX,
AVX-512-BF16). Where it has not (plain AVX2 CPUs) bf16 convolutions are
emulated, many times slower than fp32, so ``auto`` keeps fp32 there
(figures: docs/benchmarks.md). Losses, the softmax/clip term and all
optimiser state stay fp32 whatever runs the convolutions (losses.py casts
the features, parameters stay fp32).

On CUDA, fp32 means IEEE fp32: PyTorch lets cuDNN run fp32 convolutions in
TensorFloat-32 (10-bit mantissa) by default on Ampere and later, so a run
labelled fp32 would not be one, and bounds derived for fp32 would not hold.
``tf32`` is its own choice, for CUDA only.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path
from typing import ContextManager

import torch

from errors import ConfigError

PRECISIONS = ("fp32", "tf32", "bf16", "auto")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) that exclude its bf16 instructions.
ISA_CAPS_WITHOUT_BF16 = frozenset({"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core",
                                   "avx512_core_vnni"})


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    return frozenset(cpuinfo.read_text().split() if cpuinfo.exists() else ())


def cpu_has_bf16_units() -> bool:
    """Whether the CPU multiplies bf16 in hardware and oneDNN may use those instructions.

    ``ONEDNN_MAX_CPU_ISA`` (or its older name ``DNNL_MAX_CPU_ISA``) set below
    AVX512_CORE_BF16 makes oneDNN emulate bf16, so the units count as absent.
    """
    return not cpu_flags().isdisjoint(BF16_CPU_FLAGS) and _isa_cap() not in ISA_CAPS_WITHOUT_BF16


def _isa_cap() -> str:
    """oneDNN's instruction-set cap, lower case ('' when none is set)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).lower()


def cpu_has_amx_units() -> bool:
    """Whether the CPU has AMX tile units for bf16 and oneDNN may use them (a cap at AVX512_CORE_BF16
    or below excludes them)."""
    return "amx_bf16" in cpu_flags() and cpu_has_bf16_units() and _isa_cap() != "avx512_core_bf16"


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``name`` on ``device``; None means no autocast (fp32 or tf32)."""
    if name in ("fp32", "tf32"):
        if name == "tf32" and device.type != "cuda":
            raise ConfigError("--precision tf32 is CUDA's TensorFloat-32 and this run is on the CPU; use fp32 "
                              "or bf16")
        return None
    if name == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16_units()
    return torch.bfloat16 if fast else None


def set_cuda_math(tf32: bool, deterministic: bool) -> None:
    """Process-wide CUDA settings of a run: TensorFloat-32 for fp32 convolutions and matmuls only when
    asked, cuDNN's per-shape algorithm search (``benchmark``: the shapes of a run are fixed) unless
    deterministic algorithms are asked for, which also turns off cuBLAS's split reductions. The
    legacy flags are the ones set: inductor reads them, and mixing them with the newer
    ``fp32_precision`` settings is an error in PyTorch."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts


def use_deterministic_algorithms(on: bool) -> None:
    """``--deterministic``: PyTorch's deterministic kernels wherever it has them, on any device. Where
    it has none (on CUDA: the backward of grid_sample and of interpolate, which DSA's scale and
    rotate and the mosaic decoding use, and of adaptive average pooling) it warns and runs the usual
    kernel, whose atomic additions round differently from run to run."""
    torch.use_deterministic_algorithms(on, warn_only=True)


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[None]:
    """Run the enclosed network forwards in ``dtype`` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
