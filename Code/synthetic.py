"""The synthetic set: the learnable images of this process's classes and their one optimiser.

The reference steps ONE image optimiser (SGD, momentum 0.5) over the whole
set once per class, so at every class's step all other images move by their
momentum. The optimiser is elementwise and a class's loss reaches only its own
images, so a process that holds a contiguous block of classes reproduces that
exactly by stepping its block at every class's turn: with the gradient on its
own turns, with a zero gradient (momentum only) at the others'.
"""

from __future__ import annotations

from typing import Any

import torch

from augment import decode_labels, decode_mosaic, encode_mosaic
from config import Config
from data import Dataset
from distributed import World
from pool import RealSampler
from rng import make_generator


def set_labels(classes: range, ipc: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed labels of a stored set of ``classes``: ``ipc`` images per class, in class order."""
    return torch.arange(classes.start, classes.stop, device=device).repeat_interleave(ipc)


def decoded_set(stored: torch.Tensor, labels: torch.Tensor, aug: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of stored images: each 2x2 mosaic decoded to four with ``aug``."""
    return (decode_mosaic(stored), decode_labels(labels)) if aug else (stored, labels)


class SyntheticSet:
    """The images of classes ``classes`` (2x2 mosaics when ``aug``), their labels and their optimiser."""

    def __init__(self, images: torch.Tensor, classes: range, ipc: int, aug: bool, optimizer: str,
                 lr: float) -> None:
        self.images = images.detach().clone().requires_grad_(True)
        self.classes, self.ipc, self.aug = classes, ipc, aug
        self.labels = set_labels(classes, ipc, images.device)
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam([self.images], lr=lr)
        else:
            self.optimizer = torch.optim.SGD([self.images], lr=lr, momentum=0.5)

    def class_batch(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images of class c (decoded to 4 ipc when aug), with gradient."""
        first = (c - self.classes.start) * self.ipc
        return decoded_set(self.images[first:first + self.ipc], self.labels[first:first + self.ipc], self.aug)

    def compute_gradient(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The gradient of ``loss`` on this block; None is another process's class: a zero gradient,
        so that the next optimiser step is the momentum-only step the single process takes."""
        self.optimizer.zero_grad(set_to_none=False)
        if loss is not None:
            loss.backward()
        elif self.images.grad is None:
            self.images.grad = torch.zeros_like(self.images)
        return self.images.grad

    def stored(self, world: World, num_classes: int) -> torch.Tensor:
        """The whole stored set (every process's block), detached."""
        return world.gather_blocks(self.images.detach(), num_classes, self.ipc)

    def training_set(self, world: World, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole decoded set, detached: what evaluation networks train on."""
        labels = set_labels(range(num_classes), self.ipc, self.images.device)
        return decoded_set(self.stored(world, num_classes), labels, self.aug)

    def state_dict(self, world: World, num_classes: int) -> dict[str, Any]:
        """The whole set and optimiser state, gathered from every process (a collective call)."""
        def whole(value: Any) -> Any:
            is_block = isinstance(value, torch.Tensor) and value.shape == self.images.shape
            return world.gather_blocks(value, num_classes, self.ipc) if is_block else value

        state = self.optimizer.state_dict()  # its inner dicts are the optimiser's own: build new ones
        state["state"] = {key: {name: whole(value) for name, value in slot.items()}
                          for key, slot in state["state"].items()}
        return {"images": self.stored(world, num_classes), "optimizer": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this process's block of a whole saved set and optimiser state."""
        rows = slice(self.classes.start * self.ipc, self.classes.stop * self.ipc)
        optimizer = state["optimizer"]
        for slot in optimizer["state"].values():
            for name, value in slot.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    slot[name] = value[rows]
        with torch.no_grad():
            self.images.copy_(state["images"][rows])
        self.optimizer.load_state_dict(optimizer)


def initial_images(config: Config, dataset: Dataset, experiment: int, classes: range,
                   device: torch.device) -> torch.Tensor:
    """The starting images of ``classes``: random real ones (four per mosaic with aug) or standard
    normal noise, each class from its own stream so that any process can draw any class."""
    per_class = []
    for c in classes:
        generator = make_generator(config.seed, experiment, "init", c, device=device)
        if config.init == "noise":
            per_class.append(torch.randn((config.ipc, dataset.channel, *dataset.im_size), generator=generator,
                                         device=device))
            continue
        sampler = RealSampler(dataset.train, generator)
        if config.aug:
            per_class.append(encode_mosaic(*(sampler.class_batch(c, config.ipc) for _ in range(4))))
        else:
            per_class.append(sampler.class_batch(c, config.ipc))
    return torch.cat(per_class)
