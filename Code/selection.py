"""Choosing the evaluation learning rate and epoch on a validation split, never on the test set.

The validation split is a fixed share of every class of the TRAINING split,
drawn from the seed (``validation_split``). Distillation saw the whole
training split, so a set may have been distilled from validation images;
what matters is that the test split, which reports the number, plays no part
in any choice. The random real control is drawn from the rest of the training
split, so it never contains a validation image.

``select`` trains one network per learning rate of the grid under the
evaluation protocol and measures its validation accuracy after each of up to
``CHECKS`` evenly spaced epochs (the last always among them). The chosen
(learning rate, epoch) has the highest validation accuracy; ties go to the
earlier epoch, then to the grid's earlier learning rate. The reported networks
then train at that learning rate under the protocol's full schedule (the drop
stays at its epoch) and stop after the chosen epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from data import Dataset, ImageSplit
from distributed import SINGLE, World
from evaluation import EvalNet, EvalProtocol, test_accuracy, train_on_set
from errors import ConfigError
from rng import make_generator

LR_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)  # log-spaced over DD-Ranking's range
CHECKS = 10  # validation points per curve
VALIDATION_FRACTION = 0.1


def validation_split(split: ImageSplit, num_classes: int, fraction: float, seed: int
                     ) -> tuple[ImageSplit, ImageSplit]:
    """(rest, validation): ``fraction`` of every class (at least one image, never the whole class),
    chosen by one seeded shuffle, so the split depends on the seed and the data only."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val_fraction must be between 0 and 1, got {fraction}")
    device = split.labels.device
    shuffled = torch.randperm(len(split), generator=make_generator(seed, "validation", device=device), device=device)
    order = shuffled[torch.argsort(split.labels[shuffled], stable=True)]  # by class, shuffled within
    sizes = torch.bincount(split.labels, minlength=num_classes)
    if int(sizes.min()) < 2:
        raise ConfigError("every class needs at least 2 training images to hold one out for validation")
    held = (sizes.double() * fraction).round().long().clamp(1, None).minimum(sizes - 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(len(order), device=device) - starts.repeat_interleave(sizes)
    in_validation = rank < held.repeat_interleave(sizes)
    return _subset(split, order[~in_validation], num_classes), _subset(split, order[in_validation], num_classes)


def _subset(split: ImageSplit, index: torch.Tensor, num_classes: int) -> ImageSplit:
    index = index.sort().values
    return ImageSplit.from_tensors(split.images[index], split.labels[index], num_classes, split.mean, split.std)


def check_epochs(last_epoch: int, checks: int = CHECKS) -> list[int]:
    """Up to ``checks`` evenly spaced epoch indices in 0..last_epoch, ending at last_epoch."""
    count = last_epoch + 1
    return sorted({(count * (i + 1)) // checks - 1 for i in range(checks)} - {-1} | {last_epoch})


@dataclass(frozen=True)
class Selection:
    """The chosen learning rate and epoch, with every curve that chose them."""

    lr: float
    epoch: int
    validation_accuracy: float
    curves: dict[float, dict[int, float]]  # lr -> {epoch: validation accuracy in percent}

    def record(self) -> dict[str, object]:
        return {"lr": self.lr, "epoch": self.epoch, "validation_accuracy": self.validation_accuracy,
                "curves": {str(lr): {str(e): a for e, a in curve.items()} for lr, curve in self.curves.items()}}


def choose(curves: dict[float, dict[int, float]]) -> Selection:
    """The best (lr, epoch) of ``curves`` by the module's rule (ties: earlier epoch, earlier lr)."""
    candidates = [(-accuracy, epoch, index, lr) for index, (lr, curve) in enumerate(curves.items())
                  for epoch, accuracy in curve.items()]
    accuracy, epoch, _, lr = min(candidates)
    return Selection(lr, epoch, -accuracy, curves)


def validation_curve(model: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset,
                     protocol: EvalProtocol, validation: ImageSplit, seed: int, key: tuple[object, ...],
                     soft_labels: torch.Tensor | None = None) -> dict[int, float]:
    """Validation accuracy after each checked epoch of one network trained under ``protocol``."""
    member = EvalNet.fresh(model, dataset, protocol, seed, key, images.device)
    checked, curve = set(check_epochs(protocol.last_epoch)), {}

    def measure(epoch: int, net: torch.nn.Module) -> None:
        if epoch in checked:
            curve[epoch] = test_accuracy(net, validation, precision=protocol.fast.precision)

    train_on_set(member.net, images, labels, protocol, member.order, member.augment, None, soft_labels, measure)
    return curve


def select(model: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, protocol: EvalProtocol,
           validation: ImageSplit, seed: int, key: tuple[object, ...], grid: tuple[float, ...] = LR_GRID,
           soft_labels: torch.Tensor | None = None, world: World = SINGLE) -> Selection:
    """Train one network per learning rate of ``grid`` (dealt out to the processes of ``world``) and
    choose by validation accuracy. Only ``validation`` is tested: the test split is never read."""
    mine = world.deals(len(grid))
    curves = {index: validation_curve(model, images, labels, dataset, replace(protocol, lr=grid[index]), validation,
                                      seed, (*key, "select", model, grid[index]), soft_labels)
              for index in mine}
    gathered = {i: curve for share in world.gather_objects(curves) for i, curve in share.items()}
    return choose({grid[i]: gathered[i] for i in range(len(grid))})
