"""Stacked (vmap) evaluation is the same experiment as training the networks one after another."""

from pathlib import Path

import pytest
import torch

from data import DataOptions, get_dataset
from evaluation import (EvalNet, EvalProtocol, evaluate_model, evaluate_model_stacked, evaluate_set, train_on_set,
                        train_together)
from fast_paths import FastPaths, resolve_eval_batched
from helpers import UPDATE_TOLERANCE, parameters_of, update_distances

CPU = torch.device("cpu")
KEYS = [("test", k) for k in range(3)]


@pytest.fixture(scope="module")
def small(image_folder: Path):
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    return dataset, dataset.train.fetch(torch.arange(24)), dataset.train.labels[:24]


def train_both_ways(dataset, images: torch.Tensor, labels: torch.Tensor,
                    protocol: EvalProtocol) -> list[dict[str, dict[str, float]]]:
    """Train the networks of KEYS one after another and together; per network, each layer's distance
    between the two trainings relative to the sequential update (helpers.update_distances)."""
    alone = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in KEYS]
    initial = [parameters_of(member.net) for member in alone]
    for member in alone:
        train_on_set(member.net, images, labels, protocol, member.order, member.augment)
    together = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in KEYS]
    stacked = train_together(together, images, labels, protocol)
    return [update_distances({name: param[k] for name, param in stacked.params.items()},
                             parameters_of(member.net), initial[k]) for k, member in enumerate(alone)]


def test_one_stacked_sgd_step_is_the_sequential_step_up_to_rounding(small) -> None:
    """One step on the whole set: the same gradient and update rule, computed by other kernels (vmap
    makes the K convolutions one grouped convolution), so the updates agree to fp32 rounding of
    their size (1e-5 measured), far inside UPDATE_TOLERANCE; a learning rate 10 % off is 0.1."""
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=0, batch_train=len(images), fast=FastPaths(precision=None))
    for distances in train_both_ways(dataset, images, labels, protocol):
        assert max(distances.values()) < UPDATE_TOLERANCE, distances


def test_stacked_training_follows_the_sequential_trajectory(small) -> None:
    """Four epochs of three steps, through the learning-rate drop: the rounding of each step carries
    into the next but does not grow much over 12 steps (5e-6 measured). Momentum, weight decay, the
    optimiser reset at the drop and each network's own DSA draws all show here: momentum 0.8 instead
    of 0.9 moves a layer by 0.25 of its update, a network trained without DSA by 0.7."""
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=3, batch_train=8, fast=FastPaths(precision=None))
    for distances in train_both_ways(dataset, images, labels, protocol):
        assert max(distances.values()) < UPDATE_TOLERANCE, distances


def test_stacked_and_sequential_evaluation_give_the_same_accuracies(small) -> None:
    """Identical accuracies: the weights agree to rounding (above), far below the logit margins of the
    generated classes, so no test image changes side."""
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=2, batch_train=8, fast=FastPaths(precision=None))
    sequential = [evaluate_model("ConvNet", images, labels, dataset, protocol, 0, key) for key in KEYS]
    assert evaluate_model_stacked("ConvNet", images, labels, dataset, protocol, 0, KEYS) == sequential


def test_batchnorm_models_fall_back_to_sequential(small) -> None:
    dataset, images, labels = small
    protocol = EvalProtocol(epochs=0, batch_train=8, fast=FastPaths(eval_stacked=True))
    assert evaluate_model_stacked("ConvNetBN", images, labels, dataset, protocol, 0, KEYS) is None
    accuracies = evaluate_set(images, labels, ["ConvNetBN"], 2, dataset, protocol, 0, ("k",))
    assert len(accuracies["ConvNetBN"]) == 2


@pytest.mark.parametrize("name, device, expected", [("auto", "cpu", False), ("auto", "cuda", True),
                                                    ("off", "cuda", False), ("on", "cpu", True)])
def test_auto_stacks_on_gpus_only(name: str, device: str, expected: bool) -> None:
    assert resolve_eval_batched(name, torch.device(device)) is expected
