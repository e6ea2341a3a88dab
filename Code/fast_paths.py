"""The speed settings of a run, resolved once for its device: precision, compile, layout, stacked evaluation,
and whether kernels must be deterministic.

None of them changes what is computed beyond rounding (tests/test_fast_paths.py
bounds each). Every ``auto`` rule below follows bench measurements
(bench/bench.py, published Fashion-MNIST IPC-10 configuration) on the machine
kinds it names, whose figures, commands and dates are in docs/benchmarks.md;
where a kind has no measurement (channels-last on AMX, compile on CUDA)
``auto`` keeps the plain path and the flag selects the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiled import compile_network, compiler_found
from precision import cpu_has_amx_units, resolve_precision, set_cuda_math, use_deterministic_algorithms

SWITCHES = ("auto", "on", "off")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

# Compiling costs a fixed time per run (less with a warm kernel cache) and saves a part of every
# iteration, so only long runs repay it: runs shorter than this stay eager (figures: docs/benchmarks.md).
COMPILE_MIN_ITERATIONS = 200
COMPILE_MIN_EVAL_EPOCHS = 300


def resolve_eval_batched(name: str, device: torch.device) -> bool:
    """Stacked (vmap) evaluation pays off on GPUs; on CPUs training one after another is faster."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def resolve_compile(name: str, device: torch.device, precision: torch.dtype | None, long_run: bool) -> bool:
    """``auto``: on for long CPU runs with a C++ compiler, in fp32 (with AVX-512 or AVX2 kernels) or in
    bf16 on AMX units, where compiled iterations are faster than eager ones; off for bf16 on
    AVX-512-BF16 without AMX, where compiled iterations and evaluation epochs are slower than eager
    ones, and on CUDA, where it has not been measured (figures: docs/benchmarks.md)."""
    if name != "auto":
        return name == "on"
    return (device.type == "cpu" and (precision is None or cpu_has_amx_units()) and long_run
            and compiler_found())


def resolve_channels_last(name: str) -> bool:
    """``auto`` keeps contiguous (NCHW) tensors: channels-last is slower on the CPUs measured, eager and
    compiled, fp32 and bf16 (eager, PyTorch's GroupNorm kernels on channels-last tensors dominate a
    step). It may pay compiled on AMX, whose bf16 convolutions are faster on it, but no whole run has
    been measured there (figures: docs/benchmarks.md)."""
    return name == "channels_last"


@dataclass(frozen=True)
class FastPaths:
    """How the networks of a run execute; the same everywhere a network is built or run."""

    precision: torch.dtype | None = None  # autocast dtype of the forwards (None: fp32, or tf32 below)
    compiled: bool = False  # torch.compile each network trained one after another
    channels_last: bool = False  # network weights (hence activations) in NHWC layout
    eval_stacked: bool = False  # train the evaluation networks of one model together (vmap)
    tf32: bool = False  # CUDA: fp32 convolutions and matmuls in TensorFloat-32
    deterministic: bool = False  # deterministic kernels where PyTorch has them

    @classmethod
    def resolve(cls, device: torch.device, *, precision: str, compile: str, memory_format: str,
                eval_batched: str, long_run: bool, deterministic: bool = False) -> FastPaths:
        dtype = resolve_precision(precision, device)
        compiled = resolve_compile(compile, device, dtype, long_run)
        return cls(dtype, compiled, resolve_channels_last(memory_format), resolve_eval_batched(eval_batched, device),
                   tf32=precision == "tf32", deterministic=deterministic)

    def configure_process(self, device: torch.device) -> None:
        """Set the process-wide math these paths imply: on CUDA, TF32 only for tf32 and cuDNN's
        algorithm search unless deterministic; everywhere, deterministic kernels when asked."""
        if device.type == "cuda":
            set_cuda_math(self.tf32, self.deterministic)
        use_deterministic_algorithms(self.deterministic)

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` in the chosen layout, compiled if chosen (stacked networks are run functionally instead)."""
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return compile_network(net) if self.compiled else net

    def record(self) -> dict[str, Any]:
        """How the numbers were computed, for results.json (``auto`` resolves differently between machines)."""
        return {"precision": self.precision_name, "eval_stacked": self.eval_stacked, "compiled": self.compiled,
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "deterministic": self.deterministic}

    @property
    def precision_name(self) -> str:
        """What ran: fp32 (IEEE, TF32 off on CUDA), tf32 or bf16."""
        if self.precision is not None:
            return "bf16"
        return "tf32" if self.tf32 else "fp32"
