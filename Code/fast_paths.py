"""The speed settings of a run, resolved once for its device: precision, compile, layout, stacked evaluation.

None of them changes what is computed beyond rounding (tests/test_fast_paths.py
bounds each). Every ``auto`` rule below follows a bench measurement
(bench/bench.py, published Fashion-MNIST IPC-10 configuration) on the machine
kind it names; where a kind was never measured (AMX with channels-last, CUDA
with compile) ``auto`` keeps the plain path and the flag selects the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compiled import compile_network, compiler_found
from precision import cpu_has_amx_units, resolve_precision

SWITCHES = ("auto", "on", "off")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")

# Compiling costs tens of seconds per network shape and grad mode; on AMX the
# compiled iteration saved about 5 s, so runs shorter than this keep eager.
COMPILE_MIN_ITERATIONS = 200
COMPILE_MIN_EVAL_EPOCHS = 300


def resolve_eval_batched(name: str, device: torch.device) -> bool:
    """Stacked (vmap) evaluation pays off on GPUs; on CPUs training one after another is faster."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def resolve_compile(name: str, device: torch.device, precision: torch.dtype | None, long_run: bool) -> bool:
    """``auto``: on for bf16 runs on CPUs with AMX units (the issue's bench there: 9.7 against 14.6 s per
    iteration) that are long enough to repay compiling and have a C++ compiler; off elsewhere: slower on
    AMD Zen 4 with AVX-512-BF16 (11.7 against 8.5 s) and in fp32 there, never measured on CUDA."""
    if name != "auto":
        return name == "on"
    return (device.type == "cpu" and precision is not None and cpu_has_amx_units() and long_run
            and compiler_found())


def resolve_channels_last(name: str, compiled: bool) -> bool:
    """``auto``: channels-last activations only inside compiled graphs, whose fused kernels read them
    well (a compiled pool-training step 7 % faster on Zen 4); eager GroupNorm and pooling run 2.5x
    slower on them there, so eager nets stay contiguous."""
    if name != "auto":
        return name == "channels_last"
    return compiled


@dataclass(frozen=True)
class FastPaths:
    """How the networks of a run execute; the same everywhere a network is built or run."""

    precision: torch.dtype | None = None  # autocast dtype of the forwards (None: fp32)
    compiled: bool = False  # torch.compile each network trained one after another
    channels_last: bool = False  # network weights (hence activations) in NHWC layout
    eval_stacked: bool = False  # train the evaluation networks of one model together (vmap)

    @classmethod
    def resolve(cls, device: torch.device, *, precision: str, compile: str, memory_format: str,
                eval_batched: str, long_run: bool) -> FastPaths:
        dtype = resolve_precision(precision, device)
        compiled = resolve_compile(compile, device, dtype, long_run)
        return cls(dtype, compiled, resolve_channels_last(memory_format, compiled),
                   resolve_eval_batched(eval_batched, device))

    def prepare(self, net: nn.Module) -> nn.Module:
        """``net`` in the chosen layout, compiled if chosen (stacked networks are run functionally instead)."""
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return compile_network(net) if self.compiled else net

    def record(self) -> dict[str, Any]:
        """How the numbers were computed, for results.json (``auto`` resolves differently between machines)."""
        return {"precision": "fp32" if self.precision is None else "bf16", "eval_stacked": self.eval_stacked,
                "compiled": self.compiled, "memory_format": "channels_last" if self.channels_last else "contiguous"}
