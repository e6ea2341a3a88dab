"""The reference evaluation protocol: train fresh networks on a set, test them.

A fresh network is trained on the (decoded) synthetic set for
``epoch_eval_train + 1`` epochs (the reference counts 0..Epoch) with SGD
(momentum 0.9, weight decay 5e-4), per-image DSA on every batch, and the
optimiser re-created at a tenth of the learning rate after epoch index
``Epoch // 2 + 1`` (its momentum is lost, as in the reference). It is then
tested once on the whole test set. Every network draws its initialisation,
data order and augmentation from generators derived from the run seed and
its own key path, so any evaluation can be repeated alone.

Beyond the reference (``evaluate.py``'s fair evaluation): the augmentation
can be switched (``eval_augment``), the labels can be a teacher's soft labels
(``eval_labels``), and training can stop at an epoch chosen on a validation
split (``EvalProtocol.stop_epoch``, ``selection.py``), the schedule staying
that of the full protocol.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm import tqdm

from augment import DSA, ParamDiffAug
from config import Config
from data import Dataset, ImageSplit
from distributed import SINGLE, World
from eval_augment import EvalAugmentation, Mix
from eval_labels import LabelProtocol, Targets, batch_loss, batch_targets
from fast_paths import FastPaths
from networks import get_network
from precision import autocast
from rng import make_generator
from runtime import STOP

TEST_BATCH = 500
EVAL_MOMENTUM, EVAL_WEIGHT_DECAY = 0.9, 0.0005


@dataclass(frozen=True)
class EvalProtocol:
    """How one evaluation network is trained (the reference's evaluate_synset)."""

    epochs: int
    batch_train: int = Config.batch_train
    lr: float = Config.lr_net
    dsa_strategy: str = Config.dsa_strategy
    dsa_param: ParamDiffAug = field(default_factory=ParamDiffAug)
    fast: FastPaths = FastPaths()  # precision, compile, layout, stacked training
    interruptible: bool = True  # honour stop requests between epochs
    augmentation: str = "dsa"  # eval_augment.EVAL_AUGMENTATIONS
    labels: LabelProtocol = LabelProtocol()
    teacher: Any = field(default=None, compare=False)  # teachers.Teacher for label mode "teacher"
    stop_epoch: int | None = None  # the last epoch trained (None: epochs); the schedule is unchanged

    @property
    def lr_drop_epoch(self) -> int:
        return self.epochs // 2 + 1

    @property
    def last_epoch(self) -> int:
        return self.epochs if self.stop_epoch is None else self.stop_epoch

    def soft_logits(self, stored: torch.Tensor | None, batch: torch.Tensor,
                    augmented: torch.Tensor) -> torch.Tensor | None:
        """A batch's soft labels: looked up (label mode ``stored``), the teacher's on the augmented
        images (``teacher``), or none (``hard``)."""
        if self.labels.mode == "stored":
            if stored is None:
                raise ValueError("label mode stored needs the set's soft labels")
            return stored[batch]
        if self.labels.mode == "teacher":
            return self.teacher.logits(augmented, self.fast.precision)
        return None


def protocol_of(config: Config, fast: FastPaths = FastPaths()) -> EvalProtocol:
    """The reference protocol as a run's Config sets it (epochs, batch, learning rate, DSA)."""
    return EvalProtocol(config.epoch_eval_train, config.batch_train, config.lr_net, config.dsa_strategy,
                        ParamDiffAug(aug_mode=config.dsa_mode), fast)


def protocol_sgd(net: nn.Module, lr: float) -> torch.optim.SGD:
    """The protocol's optimiser: SGD with momentum 0.9 and weight decay 5e-4 (teachers train with it too)."""
    return torch.optim.SGD(net.parameters(), lr=lr, momentum=EVAL_MOMENTUM, weight_decay=EVAL_WEIGHT_DECAY)


def train_on_set(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, protocol: EvalProtocol,
                 order: torch.Generator, augment: EvalAugmentation, progress: tqdm | None = None,
                 soft_labels: torch.Tensor | None = None,
                 after_epoch: Callable[[int, nn.Module], None] | None = None) -> None:
    """Train ``net`` on ``images`` through epoch protocol.last_epoch (epochs + 1 of them unless
    stopped early), shuffled by ``order``; ``soft_labels`` are the stored ones (label mode
    ``stored``); ``after_epoch(epoch, net)`` is called after each epoch (validation curves)."""
    lr = protocol.lr
    optimizer = protocol_sgd(net, lr)
    net.train()
    for epoch in range(protocol.last_epoch + 1):
        permutation = torch.randperm(len(images), generator=order, device=order.device)
        for batch in permutation.split(protocol.batch_train):
            augmented, mix = augment(images[batch])
            targets = batch_targets(protocol.labels, labels[batch],
                                    protocol.soft_logits(soft_labels, batch, augmented), mix)
            with autocast(augmented.device, protocol.fast.precision):
                logits = net(augmented)
            loss = batch_loss(protocol.labels, logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch == protocol.lr_drop_epoch:
            lr *= 0.1
            optimizer = protocol_sgd(net, lr)
        if after_epoch is not None:
            after_epoch(epoch, net)
            net.train()
        if progress is not None:
            progress.update(1)
        if protocol.interruptible:
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


@dataclass
class EvalNet:
    """One evaluation network with its own random streams: initialisation, data order, augmentation."""

    net: nn.Module
    order: torch.Generator
    augment: EvalAugmentation

    @classmethod
    def fresh(cls, model: str, dataset: Dataset, protocol: EvalProtocol, seed: int, key: tuple[object, ...],
              device: torch.device) -> "EvalNet":
        net = get_network(model, dataset.channel, dataset.num_classes, dataset.im_size,
                          generator=make_generator(seed, *key, "init"), device=device)
        if not protocol.fast.eval_stacked:
            net = protocol.fast.prepare(net)
        dsa = DSA(protocol.dsa_strategy, make_generator(seed, *key, "dsa-choice"),
                  make_generator(seed, *key, "dsa-values", device=device), protocol.dsa_param)
        augment = EvalAugmentation(protocol.augmentation, dsa, make_generator(seed, *key, "mix-choice"),
                                   make_generator(seed, *key, "mix-order", device=device))
        return cls(net, make_generator(seed, *key, "order", device=device), augment)


def evaluate_model(model: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset,
                   protocol: EvalProtocol, seed: int, key: Iterable[object],
                   progress: tqdm | None = None, soft_labels: torch.Tensor | None = None) -> float:
    """Train one fresh ``model`` on the set and return its test accuracy (percent)."""
    member = EvalNet.fresh(model, dataset, protocol, seed, tuple(key), images.device)
    train_on_set(member.net, images, labels, protocol, member.order, member.augment, progress, soft_labels)
    return test_accuracy(member.net, dataset.test, precision=protocol.fast.precision)


class StackedNets:
    """Networks of one architecture trained as ONE vmapped computation (torch.func).

    Each keeps its own parameters, initialisation, data order and augmentation,
    so training them together is the same experiment as training them one after
    another; only the kernels differ (results agree to float rounding). The
    stacked parameters are stepped by the same ``torch.optim.SGD`` as a single
    network (momentum 0.9, weight decay 5e-4), which on CUDA updates them all in
    a few multi-tensor kernels instead of a few kernels per parameter.
    """

    def __init__(self, nets: list[nn.Module], precision: torch.dtype | None, lr: float,
                 labels: LabelProtocol = LabelProtocol()) -> None:
        self.params, self.buffers = stack_module_state(nets)
        self.params = {name: p.detach() for name, p in self.params.items()}
        self.skeleton = copy.deepcopy(nets[0]).to("meta")
        self.precision = precision
        self.labels = labels
        self.optimizer = self.sgd(lr)
        self._grads = vmap(grad(self._loss))
        self._logits = vmap(self._forward, in_dims=(0, 0, None))

    def sgd(self, lr: float) -> torch.optim.SGD:
        """The protocol's optimiser over the stacked parameters (re-created at the learning-rate drop,
        losing the momentum, as the reference does)."""
        return torch.optim.SGD(self.params.values(), lr=lr, momentum=EVAL_MOMENTUM, weight_decay=EVAL_WEIGHT_DECAY)

    def _forward(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            return functional_call(self.skeleton, (params, buffers), (x,))

    def _loss(self, params: dict, buffers: dict, x: torch.Tensor, targets: Targets) -> torch.Tensor:
        return batch_loss(self.labels, self._forward(params, buffers, x).float(), targets)

    def sgd_step(self, x: torch.Tensor, targets: Targets) -> None:
        """One step of every net on its own batch: x [K, B, C, H, W], each target [K, ...]."""
        grads = self._grads(self.params, self.buffers, x, targets)
        for name, param in self.params.items():
            param.grad = grads[name]
        self.optimizer.step()

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions of every net on the same test batch: [K]."""
        return (self._logits(self.params, self.buffers, x).argmax(dim=2) == y).sum(dim=1)


def uses_batch_statistics(net: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())


def _stacked_batch(members: list[EvalNet], images: torch.Tensor, labels: torch.Tensor, batch: torch.Tensor,
                   protocol: EvalProtocol, soft_labels: torch.Tensor | None) -> tuple[torch.Tensor, Targets]:
    """Every member's augmented batch [K, B, ...] and targets, the teacher run once on all of them."""
    drawn = [m.augment(images[index]) for m, index in zip(members, batch)]
    augmented = torch.stack([x for x, _ in drawn])
    mixes: list[Mix | None] = [mix for _, mix in drawn]
    soft = protocol.soft_logits(soft_labels, batch.flatten(), augmented.flatten(0, 1))
    soft = soft.view(*batch.shape, -1) if soft is not None else [None] * len(members)
    per_member = [batch_targets(protocol.labels, labels[index], member_soft, mix)
                  for index, member_soft, mix in zip(batch, soft, mixes)]
    return augmented, tuple(torch.stack(parts) for parts in zip(*per_member))


def train_together(members: list[EvalNet], images: torch.Tensor, labels: torch.Tensor, protocol: EvalProtocol,
                   progress: tqdm | None = None, soft_labels: torch.Tensor | None = None) -> StackedNets:
    """``train_on_set`` for several networks at once, each with its own order and augmentation."""
    stacked = StackedNets([member.net for member in members], protocol.fast.precision, protocol.lr,
                          protocol.labels)
    lr = protocol.lr
    for epoch in range(protocol.last_epoch + 1):
        orders = torch.stack([torch.randperm(len(images), generator=m.order, device=m.order.device)
                              for m in members])
        for batch in orders.split(protocol.batch_train, dim=1):
            stacked.sgd_step(*_stacked_batch(members, images, labels, batch, protocol, soft_labels))
        if epoch == protocol.lr_drop_epoch:
            lr *= 0.1
            stacked.optimizer = stacked.sgd(lr)
        if progress is not None:
            progress.update(len(members))
        if protocol.interruptible:
            STOP.check()
    return stacked


def evaluate_model_stacked(model: str, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset,
                           protocol: EvalProtocol, seed: int, keys: list[tuple[object, ...]],
                           progress: tqdm | None = None, soft_labels: torch.Tensor | None = None
                           ) -> list[float] | None:
    """Train ``len(keys)`` fresh ``model``s together; None for BatchNorm models (their
    running statistics are module state that vmap cannot update in place)."""
    members = [EvalNet.fresh(model, dataset, protocol, seed, key, images.device) for key in keys]
    if uses_batch_statistics(members[0].net):
        return None
    stacked = train_together(members, images, labels, protocol, progress, soft_labels)
    test, device = dataset.test, images.device
    correct = torch.zeros(len(members), dtype=torch.long, device=device)
    for start in range(0, len(test), TEST_BATCH):
        index = torch.arange(start, min(start + TEST_BATCH, len(test)), device=device)
        correct += stacked.correct(test.fetch(index), test.labels[index])
    return (100.0 * correct / len(test)).tolist()


def evaluate_set(images: torch.Tensor, labels: torch.Tensor, models: list[str], num_eval: int,
                 dataset: Dataset, protocol: EvalProtocol, seed: int, key: Iterable[object],
                 description: str = "evaluate", world: World = SINGLE,
                 soft_labels: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Test accuracies (percent) of ``num_eval`` fresh networks per model.

    The networks are dealt out to the processes of ``world`` and their
    accuracies gathered. With ``protocol.fast.eval_stacked`` a process's networks of one
    model train together (``evaluate_model_stacked``). Each network's random
    streams are keyed by its name, so neither choice changes the experiment.
    """
    key = tuple(key)
    images, labels = images.detach(), labels.detach()
    names = [(model, (*key, model, k)) for model in models for k in range(num_eval)]
    mine = world.deals(len(names))
    if world.distributed:
        protocol = replace(protocol, interruptible=False)  # stop requests are agreed on between iterations
    accuracies: dict[int, float] = {}
    with tqdm(total=len(mine) * (protocol.last_epoch + 1), desc=description, unit="epoch", leave=False,
              disable=None if world.is_main else True) as progress:
        for model in models:
            indices = [i for i in mine if names[i][0] == model]
            keys = [names[i][1] for i in indices]
            stacked = (evaluate_model_stacked(model, images, labels, dataset, protocol, seed, keys, progress,
                                              soft_labels)
                       if protocol.fast.eval_stacked and keys else None)
            if stacked is None:
                stacked = [evaluate_model(model, images, labels, dataset, protocol, seed, k, progress, soft_labels)
                           for k in keys]
            accuracies.update(zip(indices, stacked))
    gathered = {i: value for share in world.gather_objects(accuracies) for i, value in share.items()}
    return {model: [gathered[i] for i, (name, _) in enumerate(names) if name == model] for model in models}


def summarize(accuracies: list[float]) -> dict[str, float | int]:
    """Mean and population std (as the reference's np.std) of accuracies in percent."""
    return {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies)), "n": len(accuracies)}
