"""How evaluation training augments a batch: DSA, nothing, CutMix or Mixup.

The reference trains every evaluation network with per-image DSA (``dsa``);
``none`` switches augmentation off (what ARS compares against); ``cutmix``
and ``mixup`` are the batch-mixing augmentations of the IDC family of methods
and of DD-Ranking's default protocol. They replace DSA rather than stack on
it, as DD-Ranking's ``data_aug_func`` does.

A mixing augmentation pairs every image i of a batch with image
``partner[i]`` of the same batch (a random permutation) and keeps the share
``lam`` of image i: Mixup blends the two, ``lam * x_i + (1 - lam) * x_partner``;
CutMix pastes a box of the partner covering ``1 - lam`` of the area, where
``lam`` is recomputed from the box actually cut (it is clipped at the borders).
``lam`` is drawn uniformly from [0, 1] (Beta(1, 1), the usual choice for
both) once per batch, on the CPU (CutMix needs it as Python numbers for the
box), so no draw waits for the device. What the targets do with ``Mix`` is ``eval_labels``' business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from augment import DSA
from errors import ConfigError

EVAL_AUGMENTATIONS = ("dsa", "none", "cutmix", "mixup")


@dataclass(frozen=True)
class Mix:
    """A batch's mixing: image i kept with share ``lam`` and combined with image ``partner[i]``."""

    partner: torch.Tensor  # [B] indices into the batch
    lam: float


def cut_box(lam: float, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """A box (top, bottom, left, right) of about ``1 - lam`` of the image, centred uniformly, clipped."""
    ratio = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * ratio), int(width * ratio)
    centre_y = int(torch.randint(height, (1,), generator=generator))
    centre_x = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h // 2, height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w // 2, width)
    return top, bottom, left, right


@dataclass
class EvalAugmentation:
    """One evaluation network's augmentation, with its own streams: ``dsa`` for DSA, ``mix_choice``
    (CPU) for lam and the box, ``mix_order`` (the images' device) for the partners."""

    kind: str
    dsa: DSA
    mix_choice: torch.Generator | None = None
    mix_order: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVAL_AUGMENTATIONS:
            raise ConfigError(f"unknown evaluation augmentation {self.kind!r}; use one of "
                              f"{', '.join(EVAL_AUGMENTATIONS)}")
        if self.mixes and (self.mix_choice is None or self.mix_order is None):
            raise ValueError(f"{self.kind} needs its mix_choice and mix_order generators")

    @property
    def mixes(self) -> bool:
        return self.kind in ("cutmix", "mixup")

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Mix | None]:
        """The augmented batch and, for CutMix and Mixup, how it was mixed."""
        if self.kind == "dsa":
            return self.dsa.per_image(images), None
        if self.kind == "none":
            return images, None
        partner = torch.randperm(len(images), generator=self.mix_order, device=self.mix_order.device)
        lam = float(torch.rand((), generator=self.mix_choice))
        if self.kind == "mixup":
            return lam * images + (1.0 - lam) * images[partner], Mix(partner, lam)
        height, width = images.shape[2:]
        top, bottom, left, right = cut_box(lam, height, width, self.mix_choice)
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / (height * width)
        return mixed, Mix(partner, kept)
