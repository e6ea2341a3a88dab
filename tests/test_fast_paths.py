"""The fast paths (--precision bf16, --compile, --memory_format channels_last) compute what the fp32 eager
path does, within stated tolerances, and their auto rules pick them where the bench measured them faster."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

import compiled
import fast_paths
import networks
import precision
from config import Config, resolve_fast_paths
from data import DataOptions, get_dataset
from errors import ConfigError
from evaluation import EvalNet, EvalProtocol, train_on_set
from fast_paths import FastPaths
from helpers import CODE_DIR, UPDATE_TOLERANCE, parameters_of, tiny_experiment, update_distances, update_scales
from outputs import RunDirectory
from pool import NetPool

CPU = torch.device("cpu")
# The compiled paths are checked on a one-block ConvNet: that block holds every kind of operation the
# compiled graphs fuse (convolution, instance norm, ReLU, average pooling, then the classifier), and each
# further block only adds kernels that inductor builds with the C++ compiler, which is most of what a
# compiled test costs. All compiled tests use it at 16x16 and train in batches of 8, so a later test
# finds much of what it compiles in inductor's cache.
COMPILED_MODEL = "ConvNetD1"


def test_fp32_and_bf16_are_what_they_say() -> None:
    assert precision.resolve_precision("fp32", CPU) is None
    assert precision.resolve_precision("bf16", CPU) is torch.bfloat16


@pytest.mark.parametrize("has_units, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_uses_bf16_only_where_the_cpu_has_bf16_units(monkeypatch: pytest.MonkeyPatch, has_units: bool,
                                                          expected: torch.dtype | None) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: has_units)
    assert precision.resolve_precision("auto", CPU) is expected


@pytest.mark.parametrize("cap, usable", [(None, True), ("AVX2", False), ("avx512_core", False),
                                         ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True)])
def test_bf16_units_count_only_where_onednn_may_use_them(monkeypatch: pytest.MonkeyPatch, cap: str | None,
                                                         usable: bool) -> None:
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes oneDNN emulate bf16, so auto keeps fp32 there."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert precision.cpu_has_bf16_units() is usable


@dataclass(frozen=True)
class FirstUpdate:
    """One round of pool training and the first image update (class 0) on one path, same seed."""

    initial: dict[str, torch.Tensor]  # the pool net's parameters before its training
    trained: dict[str, torch.Tensor]  # and after it
    terms: dict[str, float]  # loss terms of the first image update

    def pool_distances(self, reference: FirstUpdate) -> dict[str, float]:
        """Per layer, how far this pool training ended from the reference's, relative to its update."""
        return update_distances(self.trained, reference.trained, reference.initial)


def first_update(folder: Path, tmp_path: Path, name: str, **speed: Any) -> FirstUpdate:
    """Eager, contiguous and fp32 unless ``speed`` says otherwise."""
    config = Config(dataset="ImageFolder", data_path=str(folder), im_size=16, ipc=2, batch_real=6, trained_bs=8,
                    model_train_steps=2, device="cpu", **{"compile": "off", "memory_format": "contiguous",
                                                          "precision": "fp32", **speed})
    experiment = tiny_experiment(config, RunDirectory.create(tmp_path, name))
    experiment.pool.push(1)
    net = experiment.pool.nets[0]
    initial = parameters_of(net.net)
    experiment.pool.train_on_real((0, 0))
    logged: list[dict[str, torch.Tensor]] = []
    experiment.log.add = logged.append
    experiment.step.match_under(net, (0, 0, 0))
    return FirstUpdate(initial, parameters_of(net.net), {k: float(v.detach()[0]) for k, v in logged[0].items()})


# bf16 keeps 8 significant bits: each rounding is off by up to u = 2^-8 (0.4 %) of the value.
# Loss terms pass through three conv blocks whose outputs are rounded, but each is a sum over
# thousands of features whose errors partly cancel: they stay within about 1 u of fp32 (0.01-0.5 %),
# and compiled and eager bf16, which round at different places, as close to each other; BF16_TOLERANCE
# (5 u) leaves room for other kernels and catches a term 10 % off. A pool net's two SGD steps on
# bf16 gradients end up to a tenth of their size from the fp32 ones, in directions that
# cancel along the fp32 update: its size along it stays within 1 % (update_scales). A pool learning
# rate 10 % off moves the loss terms by 2 % only but that size by 10 %, on every layer, so the size
# is what catches it (BF16_SCALE_TOLERANCE); the direction bound catches a gradient with a wrong
# sign (a distance of 2) or a skipped augmentation (0.7).
BF16_TOLERANCE = 0.02
BF16_SCALE_TOLERANCE = 0.04
BF16_DIRECTION_TOLERANCE = 0.3
BF16_TERMS = ("loss", "nll", "tv", "syn_ce")


def assert_within_bf16_rounding(bf16: FirstUpdate, reference: FirstUpdate) -> None:
    scales = update_scales(bf16.trained, reference.trained, reference.initial)
    assert all(abs(scale - 1) < BF16_SCALE_TOLERANCE for scale in scales.values()), scales
    distances = bf16.pool_distances(reference)
    assert max(distances.values()) < BF16_DIRECTION_TOLERANCE, distances
    for term in BF16_TERMS:
        assert bf16.terms[term] == pytest.approx(reference.terms[term], rel=BF16_TOLERANCE), term


# fp32 paths that only reorder sums (compiled kernels, NHWC layout) agree far closer: the loss terms
# to 3e-7 relative and the pool update to 3e-5 of its size, bounded by
# FP32_TERMS_REL and UPDATE_TOLERANCE; a pool learning rate 10 % off moves the loss by 0.1 %,
# syn_ce by 2 % and the update by 0.1.
FP32_TERMS_REL = 1e-4


def assert_within_fp32_rounding(other: FirstUpdate, reference: FirstUpdate) -> None:
    distances = other.pool_distances(reference)
    assert max(distances.values()) < UPDATE_TOLERANCE, distances
    for term, value in reference.terms.items():
        assert other.terms[term] == pytest.approx(value, rel=FP32_TERMS_REL, abs=1e-6), term


def test_bf16_matches_fp32_within_bf16_rounding(image_folder: Path, tmp_path: Path) -> None:
    fp32 = first_update(image_folder, tmp_path, "fp32")
    bf16 = first_update(image_folder, tmp_path, "bf16", precision="bf16")
    assert_within_bf16_rounding(bf16, fp32)
    assert fp32.terms != bf16.terms  # the bf16 path really ran in bf16


def test_compiled_matches_eager_within_fp32_rounding(image_folder: Path, tmp_path: Path) -> None:
    """Compiled kernels fuse and reorder fp32 sums, nothing else."""
    torch._dynamo.reset()  # compile afresh, so the graph count below proves the compiled path ran
    torch._dynamo.utils.counters.clear()
    eager = first_update(image_folder, tmp_path, "eager", model=COMPILED_MODEL)
    compiled_run = first_update(image_folder, tmp_path, "compiled", model=COMPILED_MODEL, compile="on")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert_within_fp32_rounding(compiled_run, eager)


def test_compiled_evaluation_trains_like_eager(image_folder: Path) -> None:
    """One evaluation epoch (two steps: DSA, SGD with momentum), compiled and eager from the same
    initialisation, end within fp32 rounding of the update (helpers.UPDATE_TOLERANCE)."""
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    images, labels = dataset.train.fetch(torch.arange(12)), dataset.train.labels[:12]
    trained, initial = [], {}
    for with_compile in (False, True):
        protocol = EvalProtocol(epochs=0, batch_train=8, fast=FastPaths(precision=None, compiled=with_compile))
        member = EvalNet.fresh(COMPILED_MODEL, dataset, protocol, 0, ("same",), CPU)
        initial = parameters_of(member.net)
        train_on_set(member.net, images, labels, protocol, member.order, member.augment)
        trained.append(parameters_of(member.net))
    distances = update_distances(trained[1], trained[0], initial)
    assert max(distances.values()) < UPDATE_TOLERANCE, distances


def test_compile_without_a_compiler_fails_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    compiled.require_compiler.cache_clear()  # a failed check is not cached, a passed one is
    net = networks.get_network("ConvNet", 1, 3, (16, 16))
    with pytest.raises(ConfigError, match="C\\+\\+ compiler.*--compile off"):
        compiled.compile_network(net)


def test_compiled_bf16_matches_eager_bf16(image_folder: Path, tmp_path: Path) -> None:
    """The AMX/CUDA fast path (bf16 autocast inside compiled graphs) runs and agrees with eager bf16
    within bf16 rounding: both round to bf16, at different places."""
    eager = first_update(image_folder, tmp_path, "eager-bf16", model=COMPILED_MODEL, precision="bf16")
    compiled_run = first_update(image_folder, tmp_path, "compiled-bf16", model=COMPILED_MODEL, precision="bf16",
                                compile="on")
    assert_within_bf16_rounding(compiled_run, eager)


@pytest.mark.parametrize("environment, folder_name", [({"ATEN_CPU_CAPABILITY": "avx2"}, "_avx2"),
                                                      ({"TORCHINDUCTOR_CACHE_DIR": "{tmp}/mine"}, "mine")])
def test_compiled_kernels_are_cached_per_aten_capability(tmp_path: Path, environment: dict[str, str],
                                                         folder_name: str) -> None:
    """Inductor's cache key omits ATEN_CPU_CAPABILITY and its kernels then fail to build under another
    capability, so each capability gets its own folder; a folder the user chose is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR")}
    env.update({k: v.format(tmp=tmp_path) for k, v in environment.items()})
    shown = subprocess.run([sys.executable, "-c", "import compiled; print(compiled.compile_cache_dir())"],
                           cwd=CODE_DIR, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert shown.endswith(folder_name)


def test_channels_last_matches_contiguous_within_fp32_rounding(image_folder: Path, tmp_path: Path) -> None:
    """NHWC weights and activations change which kernels run and in what order they sum, nothing else."""
    contiguous = first_update(image_folder, tmp_path, "contiguous")
    nhwc = first_update(image_folder, tmp_path, "nhwc", memory_format="channels_last")
    assert_within_fp32_rounding(nhwc, contiguous)


def test_prepared_networks_are_in_the_chosen_layout() -> None:
    net = FastPaths(channels_last=True).prepare(networks.get_network("ConvNet", 1, 3, (16, 16)))
    assert net.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net.features(torch.zeros(2, 1, 16, 16)).shape == (2, 128, 2, 2)


AMX_MACHINE = dict(amx=True, precision=torch.bfloat16, long_run=True, compiler=True)


@pytest.mark.parametrize("change, expected", [
    ({}, True),  # bf16 on AMX units
    ({"amx": False}, False),  # bf16 on AVX-512-BF16 only: the bench measured compiled slower
    ({"amx": False, "precision": None}, True),  # fp32: the bench measured compiled faster (AVX-512, AVX2)
    ({"long_run": False}, False),  # a short run cannot repay compiling
    ({"compiler": False}, False),  # inductor cannot build kernels
])
def test_compile_auto_follows_the_measurements_of_each_cpu_kind(monkeypatch: pytest.MonkeyPatch,
                                                                change: dict[str, Any], expected: bool) -> None:
    machine = {**AMX_MACHINE, **change}
    monkeypatch.setattr(fast_paths, "cpu_has_amx_units", lambda: machine["amx"])
    monkeypatch.setattr(fast_paths, "compiler_found", lambda: machine["compiler"])
    assert fast_paths.resolve_compile("auto", CPU, machine["precision"], machine["long_run"]) is expected


def test_compile_auto_stays_off_on_cuda_and_on_off_are_obeyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_paths, "cpu_has_amx_units", lambda: True)
    assert fast_paths.resolve_compile("auto", torch.device("cuda"), None, True) is False  # unmeasured
    assert fast_paths.resolve_compile("on", CPU, torch.bfloat16, False) is True
    assert fast_paths.resolve_compile("off", CPU, None, True) is False


@pytest.mark.parametrize("name, expected", [("auto", False), ("contiguous", False), ("channels_last", True)])
def test_channels_last_only_when_asked_for(name: str, expected: bool) -> None:
    assert fast_paths.resolve_channels_last(name) is expected


def test_a_long_run_is_counted_in_iterations_and_an_evaluation_in_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_paths, "cpu_has_amx_units", lambda: True)
    monkeypatch.setattr(fast_paths, "compiler_found", lambda: True)
    config = Config(precision="fp32", Iteration=fast_paths.COMPILE_MIN_ITERATIONS - 1,
                    epoch_eval_train=fast_paths.COMPILE_MIN_EVAL_EPOCHS)
    assert not resolve_fast_paths(config, CPU).compiled
    assert resolve_fast_paths(config, CPU, evaluation_only=True).compiled
    assert resolve_fast_paths(replace(config, Iteration=fast_paths.COMPILE_MIN_ITERATIONS), CPU).compiled


def test_amx_units_count_only_where_onednn_may_use_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert precision.cpu_has_amx_units()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not precision.cpu_has_amx_units() and precision.cpu_has_bf16_units()


def test_a_growing_compiled_pool_compiles_its_first_net_only(image_folder: Path) -> None:
    """Pool nets share the compiled code of their class (parameters are graph inputs, not constants):
    training three nets builds no graph the first one did not, so no net recompiles, and none falls
    back to eager when dynamo's per-function recompile limit is reached."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    config = Config(dataset="ImageFolder", data_path=str(image_folder), im_size=16, trained_bs=8, model_train_steps=1,
                    model=COMPILED_MODEL, fetch_net_num=3, device="cpu", precision="fp32", compile="on",
                    memory_format="contiguous")
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    pool = NetPool(config, dataset, (0,), CPU, resolve_fast_paths(config, CPU))
    pool.push(1)
    pool.train_on_real((0, 0))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    pool.push(2)
    pool.train_on_real((1, 0))
    assert graphs > 0 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
