"""The idx format: our own reader (``read_idx``) and the MNIST and Fashion-MNIST loaders,
which look in data_path and the Debian package before letting torchvision download."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from errors import DataError

from .common import DOWNLOAD_TIMEOUT_S, MNIST_CLASSES, network_timeout, one_line
from .splits import DataOptions, Dataset, make_dataset

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _check_labels(labels: torch.Tensor, num_classes: int, source: Path) -> None:
    """Out-of-range labels would otherwise surface as an index error deep in training."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{source}: labels range over [{int(labels.min())}, {int(labels.max())}] but there are "
            f"{num_classes} classes; the file is corrupt, replace it"
        )


def _read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: cannot be read ({one_line(error)}); the file is truncated or corrupt, replace it"
        ) from error


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a uint8 idx file ourselves, since Debian's recompressed copies fail torchvision's md5."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    expected_magic = (IDX_UBYTE << 8) | ndim
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x} (uint8 idx with {ndim} dims); "
            "this is not the right idx file, replace it"
        )
    if len(raw) < header:
        raise DataError(
            f"{path}: only {len(raw)} bytes, shorter than the idx header; the file is truncated, replace it"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    payload = len(raw) - header
    if payload != math.prod(dims):
        raise DataError(
            f"{path}: header says shape {dims} ({math.prod(dims)} bytes) but {payload} bytes follow; "
            "the file is truncated or corrupt, replace it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in one directory (plain or .gz), or None if any is missing."""
    found = {}
    for base in (name for pair in IDX_FILES.values() for name in pair):
        candidates = [directory / base, directory / f"{base}.gz"]
        present = [path for path in candidates if path.is_file()]
        if not present:
            return None
        found[base] = present[0]
    return found


def _read_idx_split(files: dict[str, Path], split: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,1,H,W] and labels of one split, checked against each other."""
    image_path, label_path = (files[base] for base in IDX_FILES[split])
    images = read_idx(image_path, ndim=3)
    labels = torch.from_numpy(read_idx(label_path, ndim=1)).to(torch.int64)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
            "the files come from different sources, replace them with a matching set"
        )
    _check_labels(labels, num_classes, label_path)
    return torch.from_numpy(images).unsqueeze(1), labels


def _idx_dataset(
    name: str,
    data_path: Path,
    system_dirs: tuple[Path, ...],
    install_hint: str,
    class_names: list[str],
    mean: float,
    std: float,
) -> Dataset:
    """Look in data_path, then system copies, then let torchvision download into data_path."""
    downloaded = data_path / name / "raw"
    directories = [downloaded, data_path, *system_dirs]
    files = next((found for found in map(_find_idx_files, directories) if found), None)
    if files is None:
        try:
            import torchvision  # only to download: importing it costs seconds of start-up

            with network_timeout(DOWNLOAD_TIMEOUT_S):
                getattr(torchvision.datasets, name)(str(data_path), download=True)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ... for one cause
            tried = ", ".join(str(directory) for directory in directories)
            raise DataError(
                f"{name} not found: looked for {', '.join(IDX_FILES['train'] + IDX_FILES['test'])} "
                f"(plain or .gz) in {tried}, and downloading into {downloaded} failed ({one_line(error)}); "
                f"{install_hint}"
            ) from error
        files = _find_idx_files(downloaded)
        if files is None:
            raise DataError(
                f"{name}: torchvision reported success but {downloaded} lacks the idx files; delete it and retry"
            )
    return make_dataset(
        name,
        class_names,
        [mean],
        [std],
        _read_idx_split(files, "train", len(class_names)),
        _read_idx_split(files, "test", len(class_names)),
    )


def load_mnist(data_path: Path, options: DataOptions) -> Dataset:
    hint = "run with network access so torchvision can download it into --data_path, or copy the four idx files there"
    return _idx_dataset("MNIST", data_path, (), hint, MNIST_CLASSES, 0.1307, 0.3081)


def load_fashion_mnist(data_path: Path, options: DataOptions) -> Dataset:
    hint = (
        "apt-get install dataset-fashion-mnist, or run with network access so torchvision "
        "can download it into --data_path"
    )
    return _idx_dataset("FashionMNIST", data_path, (SYSTEM_FASHION_MNIST,), hint, FASHION_MNIST_CLASSES, 0.2861, 0.3530)
