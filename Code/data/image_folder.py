"""The ImageFolder loader: train/<class>/ (and optional test/<class>/) image files, split and
normalised from the training images."""

from __future__ import annotations

from pathlib import Path

import torch

from errors import DataError
from rng import make_generator

from .image_files import decode_images, image_mode
from .splits import DataOptions, Dataset, make_dataset, per_class_indices

FOLDER_DEFAULT_SIZE = 32
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
GRAYSCALE_MODES = {"1", "L"}


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
    for indices in per_class_indices(labels, num_classes):
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


def load_image_folder(data_path: Path, options: DataOptions) -> Dataset:
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
    mode = "L" if all(image_mode(path) in GRAYSCALE_MODES for path in train_files) else "RGB"
    train_images = decode_images(train_files, size, mode)
    if test_dir.is_dir():
        if _class_dirs(test_dir) != class_names:
            raise DataError(
                f"ImageFolder: {test_dir} has classes {_class_dirs(test_dir)} but {train_dir} has {class_names}; "
                "give both the same class directories"
            )
        test_files, test_labels = _folder_files(test_dir, class_names)
        test_images = decode_images(test_files, size, mode)
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
    return make_dataset(
        "ImageFolder", class_names, mean, std, (train_images, train_labels), (test_images, test_labels)
    )
