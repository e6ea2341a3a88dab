"""The Tiny-ImageNet loader: the reference's tinyimagenet.pt, or the JPEG archive decoded once
and cached as that file."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from errors import DataError

from .common import one_line
from .image_files import decode_images
from .splits import DataOptions, Dataset, make_dataset

TINY_CACHE_NAME = "tinyimagenet.pt"
TINY_ARCHIVE_DIR = "tiny-imagenet-200"
TINY_SIZE = 64
TINY_KEYS = ("images_train", "labels_train", "images_val", "labels_val", "classes")


def _read_tiny_cache(path: Path) -> dict[str, Any]:
    """Load the reference's preprocessed dict, refusing anything that is not exactly that."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types (pickle, zip, EOF) for one cause
        raise DataError(
            f"{path} is not a readable torch file ({one_line(error)}); delete it (it is rebuilt from "
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
        raise DataError(f"cannot read {annotations} ({one_line(error)}); re-extract tiny-imagenet-200.zip") from error
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
        "images_train": decode_images(train_files, TINY_SIZE, "RGB"),
        "labels_train": train_labels,
        "images_val": decode_images(val_files, TINY_SIZE, "RGB"),
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
            f"could not cache Tiny-ImageNet at {path} ({one_line(error)}); the next run decodes the JPEGs again",
            stacklevel=3,
        )


def load_tiny_imagenet(data_path: Path, options: DataOptions) -> Dataset:
    """Prefer tinyimagenet.pt; else decode the archive once and leave the .pt behind."""
    cache = data_path / TINY_CACHE_NAME
    if cache.is_file():
        payload = _read_tiny_cache(cache)
    else:
        payload = _decode_tiny_archive(_tiny_archive_root(data_path, cache))
        _save_cache(payload, cache)
    return make_dataset(
        "TinyImageNet",
        list(payload["classes"]),
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
        (payload["images_train"], payload["labels_train"].to(torch.int64)),
        (payload["images_val"], payload["labels_val"].to(torch.int64)),
    )
