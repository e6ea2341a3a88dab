"""What a loaded dataset is: whole-split tensors with per-class indices (``ImageSplit``), both
splits plus metadata (``Dataset``), the loader settings (``DataOptions``) and the assembly step."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .whitening import ZCAWhitening


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
            class_indices=per_class_indices(labels, num_classes),
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


def per_class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Ascending indices of each class from one stable argsort, not a loop over samples."""
    order = torch.argsort(labels, stable=True)
    return list(torch.split(order, torch.bincount(labels, minlength=num_classes).tolist()))


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


def make_dataset(
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
