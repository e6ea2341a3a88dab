"""Stacked (vmap) evaluation is the same experiment as training the networks one after another."""

from pathlib import Path

import pytest
import torch

from config import resolve_eval_batched
from data import DataOptions, get_dataset
from evaluation import (EvalNet, EvalProtocol, evaluate_model, evaluate_model_stacked, evaluate_set, train_on_set,
                        train_together)

CPU = torch.device("cpu")
KEYS = [("test", k) for k in range(3)]


@pytest.fixture(scope="module")
def small(image_folder: Path):
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    return dataset, dataset.train.fetch(torch.arange(24)), dataset.train.labels[:24]


def test_stacked_training_matches_sequential_training_in_fp32(small) -> None:
    """Tolerance 1e-5: the same updates, computed by different kernels (rounding only)."""
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=3, batch_train=8)
    alone = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in KEYS]
    for member in alone:
        train_on_set(member.net, images, labels, protocol, member.order, member.dsa)
    together = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in KEYS]
    stacked = train_together(together, images, labels, protocol)
    for k, member in enumerate(alone):
        for name, param in member.net.named_parameters():
            assert torch.allclose(param, stacked.params[name][k], atol=1e-5), name


def test_stacked_and_sequential_evaluation_give_the_same_accuracies(small) -> None:
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=2, batch_train=8)
    sequential = [evaluate_model("ConvNet", images, labels, dataset, protocol, 0, key) for key in KEYS]
    assert evaluate_model_stacked("ConvNet", images, labels, dataset, protocol, 0, KEYS) == pytest.approx(sequential)


def test_batchnorm_models_fall_back_to_sequential(small) -> None:
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=0, batch_train=8, stacked=True)
    assert evaluate_model_stacked("ConvNetBN", images, labels, dataset, protocol, 0, KEYS) is None
    accuracies = evaluate_set(images, labels, ["ConvNetBN"], 2, dataset, protocol, 0, ("k",))
    assert len(accuracies["ConvNetBN"]) == 2


@pytest.mark.parametrize("name, device, expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                    ("off", "cuda", False), ("on", "cpu", True)])
def test_auto_stacks_on_gpus_only(name: str, device: str, expected: bool) -> None:
    assert resolve_eval_batched(name, torch.device(device)) is expected
