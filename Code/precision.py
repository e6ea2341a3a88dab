"""Mixed precision: the dtype convolutions run in, chosen for the device.

bf16 autocast halves the memory traffic of activations and runs on matrix
units where the hardware has them (CUDA tensor cores, Intel AMX,
AVX-512-BF16). Where it has not (AMD Zen 3 and older, plain AVX2) bf16
convolutions are emulated: a 128-channel ConvNet layer measured 65x slower
than fp32 on such a machine, so ``auto`` keeps fp32 there. Losses, the
softmax/clip term and all optimiser state stay fp32 whatever runs the
convolutions (losses.py casts the features, parameters stay fp32).
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "auto")
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
    """The autocast dtype for ``name`` on ``device``; None means plain fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16_units()
    return torch.bfloat16 if fast else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager[None]:
    """Run the enclosed network forwards in ``dtype`` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
