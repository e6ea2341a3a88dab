"""Load a dataset once into whole-split tensors that live on the device.

BACON samples real images per class at every distillation step, so each split is
kept as ONE uint8 tensor plus labels and per-class index tensors, moved to the
device once and normalised per batch on fetch. Nothing here loops over samples in
Python except where image files must be decoded one by one. A missing or corrupt
dataset is a ``DataError`` that says where we looked and how to get the data;
there is never a fallback to fake data.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import socket
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from errors import ConfigError, DataError
from rng import make_generator

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 60.0
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_UBYTE = 0x08
MNIST_CLASSES = [str(digit) for digit in range(10)]
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
TINY_CACHE_NAME = "tinyimagenet.pt"
TINY_ARCHIVE_DIR = "tiny-imagenet-200"
TINY_SIZE = 64
TINY_KEYS = ("images_train", "labels_train", "images_val", "labels_val", "classes")
FOLDER_DEFAULT_SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
GRAYSCALE_MODES = {"1", "L"}
TORCHVISION_FILES = {
    "SVHN": "train_32x32.mat and test_32x32.mat",
    "CIFAR10": "cifar-10-batches-py/",
    "CIFAR100": "cifar-100-python/",
}
ZCA_EPS = 0.1
ZCA_CHUNK_ROWS = 4096


@dataclass
class ImageSplit:
    """One split as whole tensors, so sampling a class is one index op on the device."""

    images: torch.Tensor
    labels: torch.Tensor
    class_indices: list[torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_tensors(
        cls,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        mean: torch.Tensor | list[float],
        std: torch.Tensor | list[float],
    ) -> ImageSplit:
        """Validate and index a split once, so sampling never searches the labels."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"need images [N,C,H,W] and labels [N], got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        return cls(
            images=images,
            labels=labels,
            class_indices=_class_indices(labels, num_classes),
            mean=torch.as_tensor(mean, dtype=torch.float32),
            std=torch.as_tensor(std, dtype=torch.float32),
        )

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> ImageSplit:
        """Move everything at once; fetch then never crosses devices."""
        return ImageSplit(
            images=self.images.to(device),
            labels=self.labels.to(device),
            class_indices=[indices.to(device) for indices in self.class_indices],
            mean=self.mean.to(device),
            std=self.std.to(device),
        )

    def fetch(self, index: torch.Tensor) -> torch.Tensor:
        """A float32 batch; uint8 pixels are normalised here so the split stays 4x smaller."""
        batch = self.images[index]
        if batch.is_floating_point():
            return batch
        batch = batch.to(torch.float32).div_(255)
        return batch.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))

    def class_sizes(self) -> list[int]:
        return [len(indices) for indices in self.class_indices]


def _class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Ascending indices of each class from one stable argsort, not a loop over samples."""
    order = torch.argsort(labels, stable=True)
    return list(torch.split(order, torch.bincount(labels, minlength=num_classes).tolist()))


class ZCAWhitening:
    """ZCA on flattened [0,1] pixels, as the reference's kornia ZCAWhitening(eps=0.1).

    Kept here rather than importing kornia so fitting can stream the training set in
    chunks (Tiny-ImageNet as float would not fit in memory twice) and so the inverse
    used for saving PNGs is exact.
    """

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor, inverse_matrix: torch.Tensor) -> None:
        self.mean = mean
        self.matrix = matrix
        self.inverse_matrix = inverse_matrix

    @classmethod
    def fit(cls, images: torch.Tensor, eps: float = ZCA_EPS) -> ZCAWhitening:
        """Mean and unbiased covariance in float64, then U diag(1/sqrt(S+eps)) U^T."""
        count = len(images)
        if count < 2:
            raise ValueError("ZCA needs at least two images")
        mean = sum(chunk.sum(dim=0) for chunk in _pixel_chunks(images)) / count
        covariance = torch.zeros(len(mean), len(mean), dtype=torch.float64)
        for chunk in _pixel_chunks(images):
            centered = chunk - mean
            covariance.addmm_(centered.T, centered)
        covariance /= count - 1
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(0) + eps
        matrix = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
        inverse_matrix = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return cls(mean.float(), matrix.float(), inverse_matrix.float())

    def to(self, device: torch.device | str) -> ZCAWhitening:
        return ZCAWhitening(self.mean.to(device), self.matrix.to(device), self.inverse_matrix.to(device))

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Whiten [N,...] images (uint8 pixels or floats in [0,1]) into float32 of the same shape."""
        out = torch.empty(len(images), self.matrix.shape[0], dtype=torch.float32, device=self.matrix.device)
        start = 0
        for chunk in _pixel_chunks(images):
            out[start : start + len(chunk)] = (chunk.to(self.matrix) - self.mean) @ self.matrix
            start += len(chunk)
        return out.reshape(images.shape)

    def inverse(self, whitened: torch.Tensor) -> torch.Tensor:
        """Map whitened images back to [0,1]-scale pixels (float32, same shape)."""
        flat = whitened.reshape(len(whitened), -1).to(self.inverse_matrix)
        return (flat @ self.inverse_matrix + self.mean).reshape(whitened.shape)


def _pixel_chunks(images: torch.Tensor) -> Iterator[torch.Tensor]:
    """Flattened float64 [0,1] rows a chunk at a time, so no full float copy is made."""
    flat = images.reshape(len(images), -1)
    for start in range(0, len(flat), ZCA_CHUNK_ROWS):
        chunk = flat[start : start + ZCA_CHUNK_ROWS].to(torch.float64)
        yield chunk / 255 if images.dtype == torch.uint8 else chunk


@dataclass
class Dataset:
    """Both splits plus the metadata saved next to every output.

    ``mean``/``std`` are the normalisation fetch applies: 0/1 after ZCA, whose own
    inverse (``zca``) is what ``denormalize`` undoes.
    """

    name: str
    channel: int
    im_size: tuple[int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    train: ImageSplit
    test: ImageSplit
    zca: ZCAWhitening | None = None

    def to(self, device: torch.device | str) -> Dataset:
        zca = self.zca.to(device) if self.zca is not None else None
        return replace(self, train=self.train.to(device), test=self.test.to(device), zca=zca)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Back to [0,1]-scale pixels for PNGs (unclamped: the writer clamps)."""
        if self.zca is not None:
            return self.zca.inverse(images)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return images * std + mean


@dataclass(frozen=True)
class DataOptions:
    """Loader settings that change what data a run sees (so they belong in its config)."""

    im_size: int | None = None
    test_fraction: float = 0.2
    seed: int = 0
    zca: bool = False


def _make_dataset(
    name: str,
    class_names: list[str],
    mean: list[float],
    std: list[float],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> Dataset:
    """Assemble a Dataset whose shape facts are read off the tensors, not restated."""
    num_classes = len(class_names)
    images = train[0]
    return Dataset(
        name=name,
        channel=int(images.shape[1]),
        im_size=(int(images.shape[2]), int(images.shape[3])),
        num_classes=num_classes,
        class_names=list(class_names),
        mean=[float(value) for value in mean],
        std=[float(value) for value in std],
        train=ImageSplit.from_tensors(*train, num_classes, mean, std),
        test=ImageSplit.from_tensors(*test, num_classes, mean, std),
    )


def _check_labels(labels: torch.Tensor, num_classes: int, source: Path) -> None:
    """Out-of-range labels would otherwise surface as an index error deep in training."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"{source}: labels range over [{int(labels.min())}, {int(labels.max())}] but there are "
            f"{num_classes} classes; the file is corrupt, replace it"
        )


def _one_line(error: BaseException) -> str:
    """Library messages can span lines; user errors are one line."""
    return " ".join(str(error).split())


@contextlib.contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """Bound each socket read/connect so a stalled download fails instead of hanging (restored after)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


# ---------------------------------------------------------------- idx (MNIST, Fashion-MNIST)


def _read_bytes(path: Path) -> bytes:
    """Whole file, gunzipped when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{path}: cannot be read ({_one_line(error)}); the file is truncated or corrupt, replace it"
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
            with _network_timeout(DOWNLOAD_TIMEOUT_S):
                getattr(torchvision.datasets, name)(str(data_path), download=True)
        except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ... for one cause
            tried = ", ".join(str(directory) for directory in directories)
            raise DataError(
                f"{name} not found: looked for {', '.join(IDX_FILES['train'] + IDX_FILES['test'])} "
                f"(plain or .gz) in {tried}, and downloading into {downloaded} failed ({_one_line(error)}); "
                f"{install_hint}"
            ) from error
        files = _find_idx_files(downloaded)
        if files is None:
            raise DataError(
                f"{name}: torchvision reported success but {downloaded} lacks the idx files; delete it and retry"
            )
    return _make_dataset(
        name,
        class_names,
        [mean],
        [std],
        _read_idx_split(files, "train", len(class_names)),
        _read_idx_split(files, "test", len(class_names)),
    )


def _load_mnist(data_path: Path, options: DataOptions) -> Dataset:
    hint = "run with network access so torchvision can download it into --data_path, or copy the four idx files there"
    return _idx_dataset("MNIST", data_path, (), hint, MNIST_CLASSES, 0.1307, 0.3081)


def _load_fashion_mnist(data_path: Path, options: DataOptions) -> Dataset:
    hint = (
        "apt-get install dataset-fashion-mnist, or run with network access so torchvision "
        "can download it into --data_path"
    )
    return _idx_dataset("FashionMNIST", data_path, (SYSTEM_FASHION_MNIST,), hint, FASHION_MNIST_CLASSES, 0.2861, 0.3530)


# ---------------------------------------------------------------- torchvision (SVHN, CIFAR)


def _open_torchvision(name: str, data_path: Path, **split: Any) -> Any:
    """torchvision's ``name`` from files already in data_path; only if absent, a bounded download."""
    build = partial(getattr(torchvision.datasets, name), str(data_path), **split)
    try:
        return build(download=False)
    except RuntimeError:
        pass  # not there (or failed its checksum): a download replaces it below
    except ImportError as error:
        raise DataError(f"{name} needs the Python package {error.name!r}; pip install {error.name}") from error
    except Exception as error:  # a torchvision loader can fail with pickle, OSError, ... on a damaged file
        raise DataError(
            f"{name} in {data_path} cannot be read ({_one_line(error)}); delete it so torchvision downloads it again"
        ) from error
    try:
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            return build(download=True)
    except Exception as error:  # torchvision raises RuntimeError, URLError, OSError, ... for one cause
        raise DataError(
            f"{name} not found in {data_path} (torchvision looks for {TORCHVISION_FILES[name]} there, "
            f"checksummed) and "
            f"downloading it failed ({_one_line(error)}); run with network access so torchvision can download "
            "it into --data_path, or copy those files there"
        ) from error


def _load_svhn(data_path: Path, options: DataOptions) -> Dataset:
    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        loaded = _open_torchvision("SVHN", data_path, split=name)
        return torch.from_numpy(np.ascontiguousarray(loaded.data)), torch.as_tensor(loaded.labels, dtype=torch.int64)

    return _make_dataset(
        "SVHN", MNIST_CLASSES, [0.4377, 0.4438, 0.4728], [0.1980, 0.2010, 0.1970], split("train"), split("test")
    )


def _cifar(name: str, data_path: Path, mean: list[float], std: list[float]) -> Dataset:
    """CIFAR10/100 share a loader; torchvision keeps them NHWC, we store NCHW."""
    train, test = (_open_torchvision(name, data_path, train=flag) for flag in (True, False))

    def split(loaded: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(loaded.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(loaded.targets, dtype=torch.int64)

    return _make_dataset(name, list(train.classes), mean, std, split(train), split(test))


def _load_cifar10(data_path: Path, options: DataOptions) -> Dataset:
    return _cifar("CIFAR10", data_path, [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010])


def _load_cifar100(data_path: Path, options: DataOptions) -> Dataset:
    return _cifar("CIFAR100", data_path, [0.5071, 0.4866, 0.4409], [0.2673, 0.2564, 0.2762])


# ---------------------------------------------------------------- image files


def _decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 HxWxC, resized bilinearly to size x size when needed."""
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8).reshape(size, size, -1)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({_one_line(error)}); replace or remove the file") from error


def _decode_images(paths: list[Path], size: int, mode: str) -> torch.Tensor:
    """Decode on all cores (PIL releases the GIL) into one preallocated uint8 [N,C,H,W]."""
    channels = 1 if mode == "L" else 3
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for position, pixels in enumerate(pool.map(partial(_decode_image, size=size, mode=mode), paths)):
            out[position] = pixels.transpose(2, 0, 1)
    return torch.from_numpy(out)


def _image_mode(path: Path) -> str:
    """PIL mode from the header only, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.mode
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path} ({_one_line(error)}); replace or remove the file") from error


# ---------------------------------------------------------------- Tiny-ImageNet


def _read_tiny_cache(path: Path) -> dict[str, Any]:
    """Load the reference's preprocessed dict, refusing anything that is not exactly that."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zip, EOF) for one cause
        raise DataError(
            f"{path} is not a readable torch file ({_one_line(error)}); delete it (it is rebuilt from "
            f"{TINY_ARCHIVE_DIR}/) or replace it with the reference's tinyimagenet.pt"
        ) from error
    problem = _tiny_payload_problem(payload)
    if problem:
        raise DataError(
            f"{path} is not the expected Tiny-ImageNet dict: {problem}; delete it (it is rebuilt from "
            f"{TINY_ARCHIVE_DIR}/) or replace it with the reference's tinyimagenet.pt"
        )
    return payload


def _tiny_payload_problem(payload: Any) -> str | None:
    """What is wrong with a would-be tinyimagenet.pt dict, or None if it is usable."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a dict"
    missing = [key for key in TINY_KEYS if key not in payload]
    if missing:
        return f"keys {missing} are missing"
    classes = payload["classes"]
    if not isinstance(classes, (list, tuple)) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        return "'classes' must be a list of at least two class names"
    for split in ("train", "val"):
        images, labels = payload[f"images_{split}"], payload[f"labels_{split}"]
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            return f"'images_{split}' must be a uint8 tensor [N,3,{TINY_SIZE},{TINY_SIZE}]"
        if tuple(images.shape[1:]) != (3, TINY_SIZE, TINY_SIZE):
            return f"'images_{split}' has shape {tuple(images.shape)}, expected [N,3,{TINY_SIZE},{TINY_SIZE}]"
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            return f"'labels_{split}' must be an integer tensor"
        if labels.shape != (len(images),):
            return f"'labels_{split}' has shape {tuple(labels.shape)}, expected [{len(images)}]"
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            return f"'labels_{split}' leaves [0, {len(classes)})"
    return None


def _tiny_archive_root(data_path: Path, cache: Path) -> Path:
    """The extracted tiny-imagenet-200 directory, given as its parent or itself."""
    candidates = [data_path / TINY_ARCHIVE_DIR, data_path]
    for root in candidates:
        if (root / "train").is_dir():
            return root
    tried = ", ".join(str(root / "train") for root in candidates)
    raise DataError(
        f"TinyImageNet not found: no {cache} and no {tried}; download tiny-imagenet-200.zip "
        f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) and unzip it into {data_path}, "
        "or put the reference's tinyimagenet.pt there"
    )


def _tiny_train_files(root: Path) -> tuple[list[str], list[Path], torch.Tensor]:
    """Class order is the sorted wnid directories, as in the reference."""
    wnids = sorted(entry.name for entry in (root / "train").iterdir() if entry.is_dir())
    if len(wnids) < 2:
        raise DataError(f"{root / 'train'} holds {len(wnids)} class directories; re-extract tiny-imagenet-200.zip")
    files, counts = [], []
    for wnid in wnids:
        found = sorted((root / "train" / wnid / "images").glob("*.JPEG"))
        if not found:
            raise DataError(
                f"{root / 'train' / wnid / 'images'} holds no .JPEG images; re-extract tiny-imagenet-200.zip"
            )
        files += found
        counts.append(len(found))
    return wnids, files, torch.repeat_interleave(torch.arange(len(wnids)), torch.tensor(counts))


def _tiny_val_files(root: Path, wnids: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Validation labels come from val_annotations.txt (file <tab> wnid <tab> bbox)."""
    annotations = root / "val" / "val_annotations.txt"
    try:
        lines = annotations.read_text().splitlines()
    except OSError as error:
        raise DataError(f"cannot read {annotations} ({_one_line(error)}); re-extract tiny-imagenet-200.zip") from error
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(filter(str.strip, lines), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataError(f"{annotations} line {number}: expected '<file>\\t<wnid of a train class>', got {line!r}")
        files.append(root / "val" / "images" / fields[0])
        labels.append(label_of[fields[1]])
    if not files:
        raise DataError(f"{annotations} lists no images; re-extract tiny-imagenet-200.zip")
    return files, torch.tensor(labels, dtype=torch.int64)


def _decode_tiny_archive(root: Path) -> dict[str, Any]:
    """Decode the JPEG archive into the same dict the reference's tinyimagenet.pt holds."""
    wnids, train_files, train_labels = _tiny_train_files(root)
    val_files, val_labels = _tiny_val_files(root, wnids)
    return {
        "images_train": _decode_images(train_files, TINY_SIZE, "RGB"),
        "labels_train": train_labels,
        "images_val": _decode_images(val_files, TINY_SIZE, "RGB"),
        "labels_val": val_labels,
        "classes": wnids,
    }


def _save_cache(payload: dict[str, Any], path: Path) -> None:
    """Write atomically so an interrupted run never leaves a half cache that loads as corrupt."""
    if not os.access(path.parent, os.W_OK):
        return
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        warnings.warn(
            f"could not cache Tiny-ImageNet at {path} ({_one_line(error)}); the next run decodes the JPEGs again",
            stacklevel=3,
        )


def _load_tiny_imagenet(data_path: Path, options: DataOptions) -> Dataset:
    """Prefer tinyimagenet.pt; else decode the archive once and leave the .pt behind."""
    cache = data_path / TINY_CACHE_NAME
    if cache.is_file():
        payload = _read_tiny_cache(cache)
    else:
        payload = _decode_tiny_archive(_tiny_archive_root(data_path, cache))
        _save_cache(payload, cache)
    return _make_dataset(
        "TinyImageNet",
        list(payload["classes"]),
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
        (payload["images_train"], payload["labels_train"].to(torch.int64)),
        (payload["images_val"], payload["labels_val"].to(torch.int64)),
    )


# ---------------------------------------------------------------- ImageFolder


def _class_dirs(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _folder_files(directory: Path, class_names: list[str]) -> tuple[list[Path], torch.Tensor]:
    """Image files per class (recursively, sorted) and their labels, built without a per-file label loop."""
    files, counts = [], []
    for name in class_names:
        found = sorted(
            path
            for path in (directory / name).rglob("*")
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
        )
        if not found:
            raise DataError(
                f"ImageFolder: class directory {directory / name} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the directory"
            )
        files += found
        counts.append(len(found))
    return files, torch.repeat_interleave(torch.arange(len(class_names)), torch.tensor(counts))


def _stratified_split(
    labels: torch.Tensor, num_classes: int, test_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split; each class keeps at least one training image."""
    train_parts, test_parts = [], []
    for indices in _class_indices(labels, num_classes):
        shuffled = indices[torch.randperm(len(indices), generator=generator)]
        test_count = min(round(test_fraction * len(indices)), len(indices) - 1)
        test_parts.append(shuffled[:test_count])
        train_parts.append(shuffled[test_count:])
    return torch.cat(train_parts).sort().values, torch.cat(test_parts).sort().values


def _channel_stats(images: torch.Tensor, source: Path) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of [0,1] pixels from 256-bin histograms: exact, and no float copy."""
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(images.shape[1]):
        histogram = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        mean = (histogram * levels).sum() / histogram.sum()
        std = ((histogram * (levels - mean) ** 2).sum() / histogram.sum()).sqrt()
        if std == 0:
            raise DataError(
                f"ImageFolder: every training pixel of channel {channel} in {source} is equal; use varied images"
            )
        means.append(float(mean))
        stds.append(float(std))
    return means, stds


def _load_image_folder(data_path: Path, options: DataOptions) -> Dataset:
    """train/<class>/ (and optional test/<class>/), resized square; stats from the training images."""
    size = options.im_size or FOLDER_DEFAULT_SIZE
    train_dir, test_dir = data_path / "train", data_path / "test"
    if not train_dir.is_dir():
        raise DataError(
            f"ImageFolder: {train_dir} does not exist; put one sub-directory of images per class "
            f"under {train_dir} (and optionally under {test_dir})"
        )
    class_names = _class_dirs(train_dir)
    if len(class_names) < 2:
        raise DataError(f"ImageFolder: {train_dir} holds {len(class_names)} class directories; add at least 2")
    train_files, train_labels = _folder_files(train_dir, class_names)
    mode = "L" if all(_image_mode(path) in GRAYSCALE_MODES for path in train_files) else "RGB"
    train_images = _decode_images(train_files, size, mode)
    if test_dir.is_dir():
        if _class_dirs(test_dir) != class_names:
            raise DataError(
                f"ImageFolder: {test_dir} has classes {_class_dirs(test_dir)} but {train_dir} has {class_names}; "
                "give both the same class directories"
            )
        test_files, test_labels = _folder_files(test_dir, class_names)
        test_images = _decode_images(test_files, size, mode)
    else:
        generator = make_generator(options.seed, "imagefolder-split")
        train_index, test_index = _stratified_split(train_labels, len(class_names), options.test_fraction, generator)
        if len(test_index) == 0:
            raise DataError(
                f"ImageFolder: test_fraction {options.test_fraction} leaves no test images in {train_dir}; "
                f"add images, raise --test_fraction, or provide {test_dir}"
            )
        test_images, test_labels = train_images[test_index], train_labels[test_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
    mean, std = _channel_stats(train_images, train_dir)
    return _make_dataset(
        "ImageFolder", class_names, mean, std, (train_images, train_labels), (test_images, test_labels)
    )


# ---------------------------------------------------------------- registry


DATASETS: dict[str, Callable[[Path, DataOptions], Dataset]] = {
    "MNIST": _load_mnist,
    "FashionMNIST": _load_fashion_mnist,
    "SVHN": _load_svhn,
    "CIFAR10": _load_cifar10,
    "CIFAR100": _load_cifar100,
    "TinyImageNet": _load_tiny_imagenet,
    "ImageFolder": _load_image_folder,
}


def dataset_names() -> list[str]:
    return list(DATASETS)


def _check_options(name: str, options: DataOptions) -> None:
    """Reject settings that would be silently ignored or cannot split."""
    if options.im_size is not None and name != "ImageFolder":
        raise ConfigError(f"--im_size only applies to ImageFolder ({name} has a fixed size); drop it")
    if options.im_size is not None and options.im_size < 1:
        raise ConfigError(f"--im_size must be a positive side length, got {options.im_size}")
    if not 0 < options.test_fraction < 1:
        raise ConfigError(f"--test_fraction must lie strictly between 0 and 1, got {options.test_fraction}")


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
