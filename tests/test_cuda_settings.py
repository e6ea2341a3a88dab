"""What a run asks of CUDA, checked without a GPU: the math a precision name means, cuDNN's algorithm
search, deterministic kernels, whose generator a GPU process draws from, which pooling kernel runs.

Setting the backend flags needs no device, so these read them back; the GPU
itself is exercised by scripts/gpu_check.sh.
"""

import os
import subprocess
import sys

import pytest
import torch

import utils
from errors import ConfigError
from fast_paths import FastPaths
from helpers import CODE_DIR
from networks import halving_applies

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def resolve(precision: str, device: torch.device = CUDA, deterministic: bool = False) -> FastPaths:
    return FastPaths.resolve(device, precision=precision, compile="off", memory_format="auto", eval_batched="off",
                             long_run=False, deterministic=deterministic)


@pytest.fixture(autouse=True)
def restore_backend_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.deterministic) = saved[:4]
    torch.use_deterministic_algorithms(saved[4])


@pytest.mark.parametrize("name, tf32", [("fp32", False), ("tf32", True)])
def test_fp32_on_cuda_is_ieee_fp32_and_tf32_is_asked_for_by_name(name: str, tf32: bool) -> None:
    """PyTorch runs cuDNN's fp32 convolutions in TensorFloat-32 unless told otherwise."""
    torch.backends.cudnn.allow_tf32 = not tf32
    resolve(name).configure_process(CUDA)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (tf32, tf32)


@pytest.mark.parametrize("deterministic", [False, True])
def test_cudnn_searches_algorithms_for_the_fixed_shapes_unless_deterministic(deterministic: bool) -> None:
    resolve("fp32", deterministic=deterministic).configure_process(CUDA)
    assert torch.backends.cudnn.benchmark is not deterministic
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.are_deterministic_algorithms_enabled() is deterministic
    if deterministic:
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")


def test_deterministic_kernels_are_asked_for_on_the_cpu_too() -> None:
    resolve("fp32", CPU, deterministic=True).configure_process(CPU)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()


def test_tf32_on_the_cpu_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match="tf32 is CUDA's TensorFloat-32 .* use fp32 or bf16"):
        resolve("tf32", CPU)


@pytest.mark.parametrize("name, recorded", [("fp32", "fp32"), ("tf32", "tf32"), ("bf16", "bf16")])
def test_results_name_the_math_that_ran(name: str, recorded: str) -> None:
    assert resolve(name).record()["precision"] == recorded


def test_the_reference_facade_draws_from_the_current_gpus_generator(monkeypatch) -> None:
    """Under torchrun rank k's "cuda" is cuda:k; index 0 would be another process's GPU."""
    generators = [object(), object(), object()]
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert utils.default_generator(torch.device("cuda")) is generators[2]
    assert utils.default_generator(torch.device("cuda", 1)) is generators[1]
    assert utils.default_generator(CPU) is torch.default_generator


def test_only_cpu_tensors_pool_with_the_two_pass_kernel() -> None:
    assert halving_applies(torch.zeros(1, 2, 4, 4))
    assert not halving_applies(torch.zeros(1, 2, 4, 4, device="meta"))  # any other device: PyTorch's kernel
    assert not halving_applies(torch.zeros(1, 2, 5, 4))
    assert not halving_applies(torch.zeros(1, 2, 4, 4).to(memory_format=torch.channels_last))


def test_the_compile_cache_is_inductors_own_default_folder() -> None:
    """Named without importing inductor's private modules, which older releases lack."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}
    script = ("import compiled; from torch._inductor.runtime.cache_dir_utils import default_cache_dir; "
              "print(compiled.compile_cache_dir()); print(default_cache_dir())")
    ours, inductors = subprocess.run([sys.executable, "-c", script], cwd=CODE_DIR, env=env, capture_output=True,
                                     text=True, check=True).stdout.split()
    assert ours == inductors
