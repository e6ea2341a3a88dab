"""The reference evaluation protocol: train fresh networks on a set, test them.

A fresh network is trained on the (decoded) synthetic set for
``epoch_eval_train + 1`` epochs (the reference counts 0..Epoch) with SGD
(momentum 0.9, weight decay 5e-4), per-image DSA on every batch, and the
optimiser re-created at a tenth of the learning rate after epoch index
``Epoch // 2 + 1`` (its momentum is lost, as in the reference). It is then
tested once on the whole test set. Every network draws its initialisation,
data order and augmentation from generators derived from the run seed and
its own key path, so any evaluation can be repeated alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import DSA, ParamDiffAug
from data import Dataset, ImageSplit
from networks import get_network
from precision import autocast
from rng import make_generator
from runtime import STOP

TEST_BATCH = 500


@dataclass(frozen=True)
class EvalProtocol:
    """How one evaluation network is trained (the reference's evaluate_synset)."""

    epochs: int
    batch_train: int = 256
    lr: float = 0.01
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    dsa_param: ParamDiffAug = field(default_factory=ParamDiffAug)
    precision: torch.dtype | None = None  # autocast dtype of the forwards (None: fp32)

    @property
    def lr_drop_epoch(self) -> int:
        return self.epochs // 2 + 1


def _sgd(net: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)


def train_on_set(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: EvalProtocol,
                 order: torch.Generator, dsa: DSA, progress: tqdm | None = None) -> None:
    """Train ``net`` on ``images`` for protocol.epochs + 1 epochs, shuffled by ``order``."""
    lr = protocol.lr
    optimizer = _sgd(net, lr)
    net.train()
    for epoch in range(protocol.epochs + 1):
        permutation = torch.randperm(len(images), generator=order, device=order.device)
        for batch in permutation.split(protocol.batch_train):
            augmented = dsa.per_image(images[batch])
            with autocast(augmented.device, protocol.precision):
                logits = net(augmented)
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch == protocol.lr_drop_epoch:
            lr *= 0.1
            optimizer = _sgd(net, lr)
        if progress is not None:
            progress.update(1)
        STOP.check()


@torch.no_grad()
def test_accuracy(net: nn.Module, split: ImageSplit, batch_size: int = TEST_BATCH,
                  precision: torch.dtype | None = None) -> float:
    """Top-1 accuracy in percent on the whole split (one host sync, at the end)."""
    net.eval()
    device = split.labels.device
    correct = torch.zeros((), dtype=torch.long, device=device)
    for start in range(0, len(split), batch_size):
        index = torch.arange(start, min(start + batch_size, len(split)), device=device)
        with autocast(device, precision):
            logits = net(split.fetch(index))
        correct += (logits.argmax(dim=1) == split.labels[index]).sum()
    return 100.0 * correct.item() / len(split)


def evaluate_model(model: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset,
                   protocol: EvalProtocol, seed: int, key: Iterable[object],
                   progress: tqdm | None = None) -> float:
    """Train one fresh ``model`` on the set and return its test accuracy (percent)."""
    device = images.device
    key = tuple(key)
    net = get_network(model, dataset.channel, dataset.num_classes, dataset.im_size,
                      generator=make_generator(seed, *key, "init"), device=device)
    dsa = DSA(protocol.dsa_strategy, make_generator(seed, *key, "dsa-choice"),
              make_generator(seed, *key, "dsa-values", device=device), protocol.dsa_param)
    order = make_generator(seed, *key, "order", device=device)
    train_on_set(net, images, labels, protocol, order, dsa, progress)
    return test_accuracy(net, dataset.test, precision=protocol.precision)


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, models: list[str], num_eval: int,
                 dataset: Dataset, protocol: EvalProtocol, seed: int, key: Iterable[object],
                 description: str = "evaluate") -> dict[str, list[float]]:
    """Test accuracies (percent) of ``num_eval`` fresh networks per model."""
    key = tuple(key)
    images, labels = images.detach(), labels.detach()
    total_epochs = len(models) * num_eval * (protocol.epochs + 1)
    with tqdm(total=total_epochs, desc=description, unit="epoch", leave=False, disable=None) as progress:
        return {
            model: [evaluate_model(model, images, labels, dataset, protocol, seed, (*key, model, k), progress)
                    for k in range(num_eval)]
            for model in models
        }


def summarize(accuracies: list[float]) -> dict[str, float | int]:
    """Mean and population std (as the reference's np.std) of accuracies in percent."""
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "n": len(accuracies)}
