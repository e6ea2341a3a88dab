"""--precision: which dtype runs the convolutions, and that bf16 changes the losses only slightly."""

from pathlib import Path

import pytest
import torch

import precision
from config import Config
from data import DataOptions, get_dataset
from distill import BestOnTest, Experiment
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


def first_update_terms(folder: Path, tmp_path: Path, name: str) -> dict[str, float]:
    """Loss terms of the first image update (class 0) under the given --precision, same seed."""
    config = Config(dataset="ImageFolder", data_path=str(folder), im_size=16, ipc=2, batch_real=6, trained_bs=8,
                    model_train_steps=2, precision=name, device="cpu")
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
    fp32 = first_update_terms(image_folder, tmp_path, "fp32")
    bf16 = first_update_terms(image_folder, tmp_path, "bf16")
    for term in ("loss", "nll", "syn_ce"):
        assert bf16[term] == pytest.approx(fp32[term], rel=0.02), term
    assert bf16["tv"] == pytest.approx(fp32["tv"], rel=0.05, abs=1e-3)
    assert fp32 != bf16  # the bf16 path really ran in bf16
