"""Teachers for soft-label evaluation: networks trained on the whole training split, cached on disk.

A teacher member is a fresh registry network trained on every training image
by the evaluation protocol (``evaluation.py``): SGD with momentum 0.9 and
weight decay 5e-4, per-image DSA on every batch, ``epochs + 1`` passes over
the data (the reference counts 0..Epoch), the optimiser re-created at a tenth
of the learning rate after epoch index ``epochs // 2 + 1``. Member k of seed s
draws its initialisation, data order and augmentation from
``make_generator(s, "teacher", k, name)`` with the names ``EvalNet.fresh``
uses ("init", "order", "dsa-choice", "dsa-values"), so any member can be
trained again alone.

Cache layout, in one flat ``cache_dir``::

    <dataset>_<model>_<recipe key>_<data key>_seed<s>_k<k>.pt          a finished member
    <dataset>_<model>_<recipe key>_<data key>_seed<s>_k<k>.partial.pt  its training checkpoint

A finished file holds ``state_dict`` (CPU tensors), ``test_accuracy``
(percent, on the dataset's test split), ``recipe`` (dict), ``seed``, ``k``
and ``dataset``. The partial checkpoint is rewritten after every epoch and
holds the network, its optimiser, the next epoch and the states of the
order and DSA generators, so a killed training resumes at the next epoch with
the same results bit for bit; it is deleted once the finished file exists.
Every file is replaced atomically (``outputs.atomic_write``) and read with
``weights_only=True``.

A ``Teacher`` is an ensemble of such members (or of weights given with
``--teacher``) whose float32 logits are averaged; it is frozen and always in
eval mode.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from augment import DSA
from data import Dataset, ImageSplit
from errors import ConfigError, DataError
from evaluation import protocol_sgd, test_accuracy
from networks import get_network
from outputs import atomic_write
from precision import autocast
from rng import make_generator
from runtime import STOP

KEY_LENGTH = 12  # hex digits of the recipe and data keys in file names
IDENTITY_LENGTH = 16  # hex digits of a teacher's identity
EpochCallback = Callable[[int], None]


def canonical_hash(fields: Mapping[str, Any], length: int = KEY_LENGTH) -> str:
    """sha256 of the canonical JSON of ``fields`` (sorted keys, no spaces): the same on every machine."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class TeacherRecipe:
    """How a teacher member is trained: the evaluation protocol applied to the whole training split.

    ``epochs`` means what it means in ``EvalProtocol``: epochs + 1 passes,
    the learning-rate drop after epoch index epochs // 2 + 1. ``batch`` is the
    training batch size; training runs in fp32 (no autocast), so a recipe
    names one result whatever precision the run using the teacher chose.
    """

    model: str = "ConvNet"
    epochs: int = 20
    lr: float = 0.01
    batch: int = 256
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"teacher epochs must be 0 or more, got {self.epochs}")
        if self.batch < 1:
            raise ConfigError(f"teacher batch size must be positive, got {self.batch}")
        if not self.lr > 0:
            raise ConfigError(f"teacher learning rate must be positive, got {self.lr}")

    def record(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """A short hash of every field: files of different recipes never share a name."""
        return canonical_hash(self.record())

    @property
    def lr_drop_epoch(self) -> int:
        """The epoch index after which the learning rate drops to a tenth (as ``EvalProtocol``'s)."""
        return self.epochs // 2 + 1


def data_key(dataset: Dataset) -> str:
    """A short hash of what changes the training data: a teacher trained on other data never loads."""
    return canonical_hash({
        "name": dataset.name, "im_size": list(dataset.im_size), "channel": dataset.channel,
        "num_classes": dataset.num_classes, "class_names": dataset.class_names, "train": len(dataset.train),
        "zca": dataset.zca is not None, "mean": dataset.mean, "std": dataset.std,
    })


def teacher_path(cache_dir: str | Path, dataset: Dataset, recipe: TeacherRecipe, seed: int, k: int) -> Path:
    """Where member ``k`` of ``seed`` is cached."""
    name = f"{dataset.name}_{recipe.model}_{recipe.key()}_{data_key(dataset)}_seed{seed}_k{k}.pt"
    return Path(cache_dir) / name


def checkpoint_path(path: Path) -> Path:
    """The training checkpoint beside the finished file ``path``."""
    return path.with_name(f"{path.stem}.partial.pt")


class MemberTraining:
    """One member's training state: network, optimiser, next epoch, and the order and DSA streams.

    The initialisation stream is used up when the network is built, so only
    the other generators' states are saved; resuming builds the same network,
    then overwrites its weights.
    """

    def __init__(self, dataset: Dataset, recipe: TeacherRecipe, seed: int, k: int) -> None:
        self.recipe = recipe
        device = dataset.train.labels.device
        self.net = get_network(recipe.model, dataset.channel, dataset.num_classes, dataset.im_size,
                               generator=make_generator(seed, "teacher", k, "init"), device=device)
        self.order = make_generator(seed, "teacher", k, "order", device=device)
        self.dsa = DSA(recipe.dsa_strategy, make_generator(seed, "teacher", k, "dsa-choice"),
                       make_generator(seed, "teacher", k, "dsa-values", device=device))
        self.optimizer = protocol_sgd(self.net, recipe.lr)
        self.epoch = 0  # the next epoch to train

    @property
    def passes(self) -> int:
        return self.recipe.epochs + 1

    def train_epoch(self, split: ImageSplit) -> None:
        """One pass over ``split`` in batches fetched by index (never a float copy of the whole split)."""
        self.net.train()
        permutation = torch.randperm(len(split), generator=self.order, device=self.order.device)
        for batch in permutation.split(self.recipe.batch):
            loss = F.cross_entropy(self.net(self.dsa.per_image(split.fetch(batch))), split.labels[batch])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if self.epoch == self.recipe.lr_drop_epoch:
            self.optimizer = protocol_sgd(self.net, self.optimizer.param_groups[0]["lr"] * 0.1)  # momentum lost
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "order": self.order.get_state(), "dsa_choice": self.dsa.choice_generator.get_state(),
                "dsa_values": self.dsa.value_generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])  # holds the learning rate and the momentum
        self.order.set_state(state["order"])
        self.dsa.choice_generator.set_state(state["dsa_choice"])
        self.dsa.value_generator.set_state(state["dsa_values"])


def _torch_load(path: Path, what: str, fix: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; an unreadable file is a one-line DataError that
    names it (``what`` and ``path``), the reason and the ``fix``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise DataError(f"{what} {path} cannot be read as PyTorch weights ({reason}); {fix}") from None


RETRAIN = "delete it to train that teacher again"


def train_member(dataset: Dataset, recipe: TeacherRecipe, seed: int, k: int, checkpoint: Path,
                 on_epoch: EpochCallback | None = None) -> nn.Module:
    """Train member ``k`` of ``seed``, resuming from ``checkpoint`` if it exists.

    After every epoch the checkpoint is replaced atomically, then
    ``on_epoch(epoch index)`` is called, then a stop request is honoured
    (``Interrupted``), so a stopped or killed training loses at most the
    epoch in progress and continues where it stopped.
    """
    training = MemberTraining(dataset, recipe, seed, k)
    if checkpoint.exists():
        training.load_state_dict(_torch_load(checkpoint, "teacher checkpoint", RETRAIN))
    with tqdm(total=training.passes, initial=training.epoch, desc=f"teacher {k}", unit="epoch",
              leave=False) as progress:
        while training.epoch < training.passes:
            training.train_epoch(dataset.train)
            state = training.state_dict()
            atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))
            progress.update(1)
            if on_epoch is not None:
                on_epoch(training.epoch - 1)
            STOP.check()
    return training.net


def _cached_member(path: Path, dataset: Dataset, recipe: TeacherRecipe) -> tuple[nn.Module, float]:
    """A finished member and its test accuracy from the cache."""
    payload = _torch_load(path, "teacher cache file", RETRAIN)
    if not isinstance(payload, dict) or not {"state_dict", "test_accuracy"} <= set(payload):
        raise DataError(f"teacher cache file {path} is not a teacher of this project; {RETRAIN}")
    net = _network(recipe.model, dataset, "cpu")
    misfit = _misfit(payload["state_dict"], net)
    if misfit is not None:
        raise DataError(f"teacher cache file {path} does not fit {recipe.model}: {misfit}; {RETRAIN}")
    net.load_state_dict(payload["state_dict"])
    return net.to(dataset.train.labels.device), float(payload["test_accuracy"])


def get_member(dataset: Dataset, recipe: TeacherRecipe, seed: int, k: int, cache_dir: Path,
               on_epoch: EpochCallback | None = None) -> tuple[nn.Module, float]:
    """Member ``k`` and its test accuracy: loaded from the cache, or trained, tested and cached."""
    path = teacher_path(cache_dir, dataset, recipe, seed, k)
    if path.exists():
        return _cached_member(path, dataset, recipe)
    net = train_member(dataset, recipe, seed, k, checkpoint_path(path), on_epoch)
    accuracy = test_accuracy(net, dataset.test)
    payload = {"state_dict": {name: value.detach().cpu() for name, value in net.state_dict().items()},
               "test_accuracy": accuracy, "recipe": recipe.record(), "seed": seed, "k": k,
               "dataset": dataset.name}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    checkpoint_path(path).unlink(missing_ok=True)
    return net, accuracy


def _parameter_digest(nets: Sequence[nn.Module]) -> str:
    """sha256 over every member's state (names, dtypes, shapes, bytes) in member order."""
    digest = hashlib.sha256()
    for net in nets:
        for name, value in net.state_dict().items():
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:IDENTITY_LENGTH]


class Teacher(nn.Module):
    """An ensemble of K frozen networks whose float32 logits are averaged.

    It is built on the test split's device and its accuracy is measured there,
    so every Teacher carries the test accuracy of each member and of the
    ensemble. Its parameters never take gradients and ``train()`` leaves it
    in eval mode: a teacher's labels must not move while a student trains
    (BatchNorm statistics, dropout). ``identity`` names its weights: equal
    for the same weights however they were obtained, different otherwise.
    """

    def __init__(self, nets: Sequence[nn.Module], member_accuracies: Sequence[float], test: ImageSplit) -> None:
        super().__init__()
        if not nets or len(nets) != len(member_accuracies):
            raise ValueError("a teacher needs at least one network and one accuracy per network")
        self.nets = nn.ModuleList(nets).to(test.labels.device)
        self.requires_grad_(False)
        self.eval()
        self.member_accuracies = [float(value) for value in member_accuracies]
        self.identity = _parameter_digest(self.nets)
        self.test_accuracy = test_accuracy(self, test)

    @property
    def members(self) -> int:
        return len(self.nets)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(x).float() for net in self.nets]).mean(dim=0)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, precision: torch.dtype | None = None) -> torch.Tensor:
        """The averaged logits of ``x`` in float32, the forwards under autocast to ``precision``."""
        with autocast(x.device, precision):
            return self(x)


def get_teachers(dataset: Dataset, recipe: TeacherRecipe, seed: int, count: int, cache_dir: str | Path,
                 device: torch.device | str, on_epoch: EpochCallback | None = None) -> Teacher:
    """An ensemble of members 0..count-1 of ``seed``: cached ones loaded, missing ones trained (on the
    dataset's device) and cached; the Teacher is returned on ``device``."""
    if count < 1:
        raise ConfigError(f"a teacher ensemble needs at least one member, got {count}")
    members = [get_member(dataset, recipe, seed, k, Path(cache_dir), on_epoch) for k in range(count)]
    return Teacher([net for net, _ in members], [accuracy for _, accuracy in members], dataset.test).to(device)


def _network(model: str, dataset: Dataset, device: torch.device | str) -> nn.Module:
    """A ``model`` shaped for ``dataset``; its weights are overwritten by loading (drawn from a fixed
    generator so building it never touches the global RNG)."""
    return get_network(model, dataset.channel, dataset.num_classes, dataset.im_size,
                       generator=make_generator(0, "teacher", "load"), device=device)


def _state_dict_of(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """The weights in a loaded ``--teacher`` file: a plain state_dict or a dict with "state_dict"."""
    weights = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in weights.items()):
        raise DataError(f"--teacher {path} holds no network weights; give a state_dict, or a dict with "
                        "'state_dict', saved by torch.save")
    return weights


def _misfit(weights: Mapping[str, torch.Tensor], net: nn.Module) -> str | None:
    """The first difference between ``weights`` and ``net``'s state, in words; None when they fit."""
    expected = net.state_dict()
    for name, value in expected.items():
        if name not in weights:
            return f"the file lacks {name}"
        if weights[name].shape != value.shape:
            return f"{name} is {list(weights[name].shape)} in the file, {list(value.shape)} in the model"
    extra = next((name for name in weights if name not in expected), None)
    return None if extra is None else f"the file has {extra}, which the model lacks"


def _loaded_network(path: Path, dataset: Dataset, model: str) -> nn.Module:
    if not path.is_file():
        raise DataError(f"--teacher {path}: no such file; give the path of saved teacher weights")
    weights = _state_dict_of(_torch_load(path, "--teacher", "give a file saved by torch.save"), path)
    net = _network(model, dataset, "cpu")
    misfit = _misfit(weights, net)
    if misfit is not None:
        raise DataError(f"--teacher {path} does not fit {model} for {dataset.name} ({dataset.channel}x"
                        f"{dataset.im_size[0]}x{dataset.im_size[1]}, {dataset.num_classes} classes): {misfit}; "
                        "name its architecture with --teacher_model, or give a teacher of this dataset")
    net.load_state_dict(weights)
    return net.to(dataset.test.labels.device)


def load_teacher(paths: str | Path | Sequence[str | Path], dataset: Dataset, model: str,
                 device: torch.device | str) -> Teacher:
    """A Teacher from saved weights (``--teacher PATH[,PATH...]``: several make an ensemble), each file
    a state_dict of ``model`` for ``dataset`` or a dict with "state_dict" (as the cache holds).
    The accuracies are measured here on the dataset's test split, whatever a file claims."""
    if isinstance(paths, (str, Path)):
        paths = [part for part in str(paths).split(",") if part]
    nets = [_loaded_network(Path(path), dataset, model) for path in paths]
    if not nets:
        raise ConfigError("--teacher needs at least one path")
    accuracies = [test_accuracy(net, dataset.test) for net in nets]
    return Teacher(nets, accuracies, dataset.test).to(device)
