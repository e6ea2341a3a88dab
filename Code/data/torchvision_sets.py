"""SVHN, CIFAR-10 and CIFAR-100 through torchvision, from files in data_path or a bounded download."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from errors import DataError

from .common import DOWNLOAD_TIMEOUT_S, MNIST_CLASSES, network_timeout, one_line
from .splits import DataOptions, Dataset, make_dataset

TORCHVISION_FILES = {
    "SVHN": "train_32x32.mat and test_32x32.mat",
    "CIFAR10": "cifar-10-batches-py/",
    "CIFAR100": "cifar-100-python/",
}


def _open_torchvision(name: str, data_path: Path, **split: Any) -> Any:
    """torchvision's ``name`` from files already in data_path; only if absent, a bounded download.
    torchvision is imported here, when such a dataset is loaded, not at start-up (seconds)."""
    import torchvision

    build = partial(getattr(torchvision.datasets, name), str(data_path), **split)
    try:
        return build(download=False)
    except RuntimeError:
        pass  # not there (or failed its checksum): a download replaces it below
    except ImportError as error:
        raise DataError(f"{name} needs the Python package {error.name!r}; pip install {error.name}") from error
    except Exception as error:  # a torchvision loader can fail with pickle, OSError, ... on a damaged file
        raise DataError(
            f"{name} in {data_path} cannot be read ({one_line(error)}); delete it so torchvision downloads it again"
        ) from error
    try:
        with network_timeout(DOWNLOAD_TIMEOUT_S):
            return build(download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ... for one cause
        raise DataError(
            f"{name} not found in {data_path} (torchvision looks for {TORCHVISION_FILES[name]} there, "
            f"checksummed) and "
            f"downloading it failed ({one_line(error)}); run with network access so torchvision can download "
            "it into --data_path, or copy those files there"
        ) from error


def load_svhn(data_path: Path, options: DataOptions) -> Dataset:
    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = _open_torchvision("SVHN", data_path, split=name)
        return torch.from_numpy(np.ascontiguousarray(loaded.data)), torch.as_tensor(loaded.labels, dtype=torch.int64)

    return make_dataset(
        "SVHN", MNIST_CLASSES, [0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970], split("train"), split("test")
    )


def _cifar(name: str, data_path: Path, mean: list[float], std: list[float]) -> Dataset:
    """CIFAR10/100 share a loader; torchvision keeps them NHWC, we store NCHW."""
    train, test = (_open_torchvision(name, data_path, train=flag) for flag in (True, False))

    def split(loaded: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(loaded.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(loaded.targets, dtype=torch.int64)

    return make_dataset(name, list(train.classes), mean, std, split(train), split(test))


def load_cifar10(data_path: Path, options: DataOptions) -> Dataset:
    return _cifar("CIFAR10", data_path, [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])


def load_cifar100(data_path: Path, options: DataOptions) -> Dataset:
    return _cifar("CIFAR100", data_path, [0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762])
