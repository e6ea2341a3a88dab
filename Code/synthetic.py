"""The synthetic set: the learnable images of this process's classes and their optimiser.

Stored images are 2x2 mosaics with ``--aug`` (decoded to four training images
each). The set holds the classes of this process's chunks (``ClassLayout``);
its optimiser (image_optimizer.py) steps a class's rows at that class's turn,
so a process needs no other class's images. Reading the whole set gathers
every process's caught-up rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from augment import decode_labels, decode_mosaic, encode_mosaic
from distributed import ClassLayout
from image_optimizer import PER_CLASS_STATE, ImageOptimizer, make_image_optimizer
from rng import make_generator
from sampling import RealSampler

if TYPE_CHECKING:
    from config import Config
    from data import Dataset


def set_labels(classes: range, ipc: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fixed labels of a stored set of ``classes``: ``ipc`` images per class, in class order."""
    return torch.arange(classes.start, classes.stop, device=device).repeat_interleave(ipc)


def decoded_set(stored: torch.Tensor, labels: torch.Tensor, aug: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of stored images: each 2x2 mosaic decoded to four with ``aug``."""
    return (decode_mosaic(stored), decode_labels(labels)) if aug else (stored, labels)


class SyntheticSet:
    """The images of this process's classes (2x2 mosaics when ``aug``) and their optimiser."""

    def __init__(self, images: torch.Tensor, layout: ClassLayout, ipc: int, aug: bool,
                 optimizer: ImageOptimizer) -> None:
        self.layout, self.ipc, self.aug = layout, ipc, aug
        self.optimizer = optimizer

    @classmethod
    def create(cls, images: torch.Tensor, layout: ClassLayout, config: Config, lazy: bool) -> SyntheticSet:
        """The set of ``layout.mine`` starting from ``images``; ``lazy``: per-class optimiser rows."""
        optimizer = make_image_optimizer(images, layout.mine, config.ipc, config.optim, config.lr_img, lazy)
        return cls(images, layout, config.ipc, config.aug, optimizer)

    @property
    def classes(self) -> range:
        return self.layout.mine

    @property
    def images_per_class(self) -> int:
        """Training images each class decodes to."""
        return 4 * self.ipc if self.aug else self.ipc

    def training_images(self, stored: torch.Tensor, classes: int) -> torch.Tensor:
        """The training images of the stored rows of ``classes`` consecutive classes, class by class."""
        return decode_mosaic(stored, classes) if self.aug else stored

    def stored(self) -> torch.Tensor:
        """The whole stored set (every process's classes, caught up to now), detached."""
        return self.layout.gather(self.optimizer.current(), self.ipc)

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole decoded set, detached: what evaluation networks train on."""
        stored = self.stored()
        return decoded_set(stored, set_labels(range(self.layout.num_classes), self.ipc, stored.device), self.aug)

    def state_dict(self) -> dict[str, Any]:
        """The whole set and optimiser state, gathered from every process (a collective call): tensors
        with one row per image or one entry per class, and the turn count."""
        state = self.optimizer.state_dict()
        if state["kind"] == "whole_set":  # one process holds everything
            return state
        return {name: self.layout.gather(value, 1 if name in PER_CLASS_STATE else self.ipc)
                if isinstance(value, torch.Tensor) else value for name, value in state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this process's classes of a whole saved set and optimiser state."""
        if state["kind"] == "whole_set":
            self.optimizer.load_state_dict(state)
            return
        classes = self.classes
        per_image, per_class = slice(classes.start * self.ipc, classes.stop * self.ipc), slice(classes.start,
                                                                                             classes.stop)
        self.optimizer.load_state_dict({
            name: value[per_class if name in PER_CLASS_STATE else per_image] if isinstance(value, torch.Tensor)
            else value for name, value in state.items()})


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
    if not per_class:  # a process holding no class
        return torch.empty((0, dataset.channel, *dataset.im_size), device=device)
    return torch.cat(per_class)
