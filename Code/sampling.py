"""Random real batches of a split, by class or from the whole split.

Pool training, the image steps, the initial set and the random-real control
draw their real images through ``RealSampler``, each from a generator keyed by where it is
used (rng.make_generator), so a draw never depends on what else was drawn or
on the number of processes. Batches are drawn on the data's device, without
per-sample loops.
"""

from __future__ import annotations

import torch

from data import ImageSplit


class RealSampler:
    """Random real batches, drawn on the data's device without per-sample loops."""

    def __init__(self, split: ImageSplit, generator: torch.Generator) -> None:
        self.split = split
        self.generator = generator

    def _shuffled(self, size: int) -> torch.Tensor:
        return torch.randperm(size, generator=self.generator, device=self.generator.device)

    def class_batch(self, c: int, n: int) -> torch.Tensor:
        """n distinct images of class c (all of them when the class is smaller)."""
        indices = self.split.class_indices[c]
        return self.split.fetch(indices[self._shuffled(len(indices))[:n]])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct images drawn uniformly from the whole split, with labels."""
        index = self._shuffled(len(self.split))[:n]
        return self.split.fetch(index), self.split.labels[index]
