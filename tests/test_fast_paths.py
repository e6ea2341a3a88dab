"""The fast paths (--precision bf16, --compile) compute what the fp32 eager path does, within stated tolerances."""

from pathlib import Path
from typing import Any

import pytest
import torch

import networks
import precision
from config import Config
from data import DataOptions, get_dataset
from distill import BestOnTest, Experiment
from errors import ConfigError
from evaluation import EvalNet, EvalProtocol, train_on_set
from methods import get_method
from outputs import RunDirectory

CPU = torch.device("cpu")


def test_fp32_and_bf16_are_what_they_say() -> None:
    assert precision.resolve_precision("fp32", CPU) is None
    assert precision.resolve_precision("bf16", CPU) is torch.bfloat16


@pytest.mark.parametrize("has_units, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_uses_bf16_only_where_the_cpu_has_bf16_units(monkeypatch: pytest.MonkeyPatch, has_units: bool,
                                                          expected: torch.dtype | None) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: has_units)
    assert precision.resolve_precision("auto", CPU) is expected


def first_update_terms(folder: Path, tmp_path: Path, name: str, **speed: Any) -> dict[str, float]:
    """Loss terms of the first image update (class 0) after one round of pool training, same seed."""
    config = Config(dataset="ImageFolder", data_path=str(folder), im_size=16, ipc=2, batch_real=6, trained_bs=8,
                    model_train_steps=2, device="cpu", **speed)
    dataset = get_dataset("ImageFolder", folder, DataOptions(im_size=16))
    experiment = Experiment(config, get_method("bacon"), dataset, RunDirectory.create(tmp_path, name), 0, CPU,
                            BestOnTest())
    experiment.pool.push(1)
    experiment.pool.train_on_real(experiment.sampler)
    logged: list[dict[str, torch.Tensor]] = []
    experiment.log.add = logged.append
    experiment.update_images(experiment.pool.nets[0])
    return {name: float(value.detach()) for name, value in logged[0].items()}


def test_bf16_losses_match_fp32_within_two_percent(image_folder: Path, tmp_path: Path) -> None:
    """The tolerance: bf16 keeps 8 mantissa bits (relative error ~0.4 % per op) through three conv blocks."""
    fp32 = first_update_terms(image_folder, tmp_path, "fp32", precision="fp32")
    bf16 = first_update_terms(image_folder, tmp_path, "bf16", precision="bf16")
    for term in ("loss", "nll", "syn_ce"):
        assert bf16[term] == pytest.approx(fp32[term], rel=0.02), term
    assert bf16["tv"] == pytest.approx(fp32["tv"], rel=0.05, abs=1e-3)
    assert fp32 != bf16  # the bf16 path really ran in bf16


def test_compiled_losses_match_eager_within_1e4(image_folder: Path, tmp_path: Path) -> None:
    """Compiled kernels fuse and reorder float sums, nothing else: pool training, the embeddings
    and every loss term agree with eager fp32 to float rounding (tolerance 1e-4 relative)."""
    torch._dynamo.reset()  # compile afresh, so the graph count below proves the compiled path ran
    torch._dynamo.utils.counters.clear()
    eager = first_update_terms(image_folder, tmp_path, "eager", precision="fp32")
    compiled = first_update_terms(image_folder, tmp_path, "compiled", precision="fp32", compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for term, value in eager.items():
        assert compiled[term] == pytest.approx(value, rel=1e-4, abs=1e-6), term


def test_compiled_evaluation_trains_like_eager(image_folder: Path) -> None:
    """One evaluation epoch (DSA, SGD with momentum) gives the same weights to 1e-4."""
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    images, labels = dataset.train.fetch(torch.arange(12)), dataset.train.labels[:12]
    trained = []
    for compiled in (False, True):
        protocol = EvalProtocol(epochs=0, batch_train=8, compiled=compiled)
        member = EvalNet.fresh("ConvNet", dataset, protocol, 0, ("same",), CPU)
        train_on_set(member.net, images, labels, protocol, member.order, member.dsa)
        trained.append(member.net.state_dict())
    for name, eager in trained[0].items():
        torch.testing.assert_close(trained[1][name], eager, rtol=1e-4, atol=1e-5, msg=name)


def test_compile_without_a_compiler_fails_before_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    networks.require_compiler.cache_clear()  # a failed check is not cached, a passed one is
    net = networks.get_network("ConvNet", 1, 3, (16, 16))
    with pytest.raises(ConfigError, match="C\\+\\+ compiler.*without --compile"):
        networks.compile_network(net)


def test_compiled_bf16_matches_eager_bf16(image_folder: Path, tmp_path: Path) -> None:
    """The AMX/CUDA fast path (bf16 autocast inside compiled graphs) runs and agrees with eager bf16
    to bf16 rounding (1 %)."""
    eager = first_update_terms(image_folder, tmp_path, "eager-bf16", precision="bf16")
    compiled = first_update_terms(image_folder, tmp_path, "compiled-bf16", precision="bf16", compile=True)
    for term in ("loss", "nll", "tv", "syn_ce"):
        assert compiled[term] == pytest.approx(eager[term], rel=0.01), term
