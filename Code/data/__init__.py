"""Load a dataset once into whole-split tensors that live on the device.

BACON samples real images per class at every distillation step, so each split is
kept as ONE uint8 tensor plus labels and per-class index tensors, moved to the
device once and normalised per batch on fetch. Nothing here loops over samples in
Python except where image files must be decoded one by one. A missing or corrupt
dataset is a ``DataError`` that says where we looked and how to get the data;
there is never a fallback to fake data. Each source format has its own loader module;
``DATASETS`` maps every dataset name to its loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from errors import ConfigError

from .idx import load_fashion_mnist, load_mnist, read_idx
from .image_folder import load_image_folder
from .splits import DataOptions, Dataset, ImageSplit
from .tiny_imagenet import load_tiny_imagenet
from .torchvision_sets import load_cifar10, load_cifar100, load_svhn
from .whitening import ZCAWhitening

__all__ = [
    "DATASETS",
    "DataOptions",
    "Dataset",
    "ImageSplit",
    "ZCAWhitening",
    "dataset_names",
    "get_dataset",
    "read_idx",
]

DATASETS: dict[str, Callable[[Path, DataOptions], Dataset]] = {
    "MNIST": load_mnist,
    "FashionMNIST": load_fashion_mnist,
    "SVHN": load_svhn,
    "CIFAR10": load_cifar10,
    "CIFAR100": load_cifar100,
    "TinyImageNet": load_tiny_imagenet,
    "ImageFolder": load_image_folder,
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def _check_options(name: str, options: DataOptions) -> None:
    """Reject a setting that would be silently ignored (the ranges are checked with the config)."""
    if options.im_size is not None and name != "ImageFolder":
        raise ConfigError(f"--im_size only applies to ImageFolder ({name} has a fixed size); drop it")


def _whiten(dataset: Dataset) -> Dataset:
    """Fit ZCA on the training pixels; whitened splits are float and fetched as-is."""
    zca = ZCAWhitening.fit(dataset.train.images)
    zeros, ones = torch.zeros(dataset.channel), torch.ones(dataset.channel)

    def whiten_split(split: ImageSplit) -> ImageSplit:
        return replace(split, images=zca.transform(split.images), mean=zeros, std=ones)

    return replace(
        dataset,
        mean=[0.0] * dataset.channel,
        std=[1.0] * dataset.channel,
        train=whiten_split(dataset.train),
        test=whiten_split(dataset.test),
        zca=zca,
    )


def get_dataset(name: str, data_path: str | Path, options: DataOptions = DataOptions()) -> Dataset:
    """Load ``name`` from ``data_path`` on the CPU; the caller moves it to the device once."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}")
    _check_options(name, options)
    dataset = DATASETS[name](Path(data_path).expanduser(), options)
    return _whiten(dataset) if options.zca else dataset
