"""Differentiable Siamese Augmentation (DSA) and multi-formation decoding.

DSA transforms real and synthetic batches with the *same* random parameters
(Siamese mode) so that matching their features compares like with like, and
every op is differentiable with respect to the images so gradients reach the
synthetic set. Evaluation training uses the per-image mode instead.

Unlike the reference, which reseeds torch's global RNG for every draw, all
randomness comes from two explicit generators: a CPU one for the choice of op
group (a Python-side branch, so drawing it on the CPU avoids a device sync)
and one on the images' device for the op parameters.

Multi-formation (``--aug``) stores a 2x2 mosaic in each synthetic image;
``decode_mosaic`` turns n stored images into 4n training images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from errors import ConfigError

Params = dict[str, torch.Tensor]


@dataclass
class ParamDiffAug:
    """DSA hyper-parameters (the reference's defaults); aug_mode 'S' = single, 'M' = multiple."""

    aug_mode: str = "S"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass(frozen=True)
class DrawContext:
    """What an op needs to draw its parameters: how many sets, image size, streams."""

    n: int
    height: int
    width: int
    param: ParamDiffAug
    generator: torch.Generator

    def uniform(self) -> torch.Tensor:
        return torch.rand(self.n, generator=self.generator, device=self.generator.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (self.n,), generator=self.generator, device=self.generator.device)


@dataclass(frozen=True)
class AugmentOp:
    """One differentiable op: ``sample`` draws parameters, ``apply`` uses them.

    Parameters have a leading dimension of 1 (Siamese: broadcast over any
    batch) or of the batch size (one set per image).
    """

    sample: Callable[[DrawContext], Params]
    apply: Callable[[torch.Tensor, Params], torch.Tensor]


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _sample_brightness(ctx: DrawContext) -> Params:
    return {"shift": (ctx.uniform() - 0.5) * ctx.param.brightness}


def _apply_brightness(x: torch.Tensor, q: Params) -> torch.Tensor:
    return x + _per_image(q["shift"]).to(x.dtype)


def _sample_saturation(ctx: DrawContext) -> Params:
    return {"factor": ctx.uniform() * ctx.param.saturation}


def _apply_saturation(x: torch.Tensor, q: Params) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_image(q["factor"]).to(x.dtype) + mean


def _sample_contrast(ctx: DrawContext) -> Params:
    return {"factor": ctx.uniform() + ctx.param.contrast}


def _apply_contrast(x: torch.Tensor, q: Params) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_image(q["factor"]).to(x.dtype) + mean


def _sample_flip(ctx: DrawContext) -> Params:
    return {"flip": ctx.uniform() < ctx.param.prob_flip}


def _apply_flip(x: torch.Tensor, q: Params) -> torch.Tensor:
    return torch.where(q["flip"].view(-1, 1, 1, 1), x.flip(3), x)


def _sample_scale(ctx: DrawContext) -> Params:
    low, high = 1.0 / ctx.param.ratio_scale, ctx.param.ratio_scale
    sx = ctx.uniform() * (high - low) + low
    sy = ctx.uniform() * (high - low) + low
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return {"theta": theta}


def _sample_rotate(ctx: DrawContext) -> Params:
    angle = (ctx.uniform() - 0.5) * 2 * ctx.param.ratio_rotate / 180 * math.pi
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return {"theta": theta}


def _apply_affine(x: torch.Tensor, q: Params) -> torch.Tensor:
    theta = q["theta"].to(x.dtype)
    grid = F.affine_grid(theta, [theta.shape[0], *x.shape[1:]], align_corners=False)
    grid = grid.expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _sample_crop(ctx: DrawContext) -> Params:
    ratio = ctx.param.ratio_crop_pad
    shift_h, shift_w = int(ctx.height * ratio + 0.5), int(ctx.width * ratio + 0.5)
    return {"dy": ctx.randint(-shift_h, shift_h + 1), "dx": ctx.randint(-shift_w, shift_w + 1)}


def _shift_along(x: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """out[..., i, ...] = x[..., i + shift, ...] along ``dim`` (2 or 3), zero outside the image."""
    size = x.shape[dim]
    source = torch.arange(size, device=x.device).unsqueeze(0) + shift.unsqueeze(1)
    inside = (source >= 0) & (source < size)
    view = (-1, 1, size, 1) if dim == 2 else (-1, 1, 1, size)
    index = source.clamp(0, size - 1).view(view).expand(x.shape[0], *x.shape[1:])
    return x.gather(dim, index) * inside.view(view).to(x.dtype)


def _apply_crop(x: torch.Tensor, q: Params) -> torch.Tensor:
    """Integer translation with zero fill: the reference's pad-by-one-and-clamp crop."""
    return _shift_along(_shift_along(x, q["dy"], 2), q["dx"], 3)


def _sample_cutout(ctx: DrawContext) -> Params:
    ratio = ctx.param.ratio_cutout
    size_h, size_w = int(ctx.height * ratio + 0.5), int(ctx.width * ratio + 0.5)
    centre_y = ctx.randint(0, ctx.height + (1 - size_h % 2))
    centre_x = ctx.randint(0, ctx.width + (1 - size_w % 2))
    top, left = centre_y - size_h // 2, centre_x - size_w // 2
    return {"top": top, "bottom": top + size_h, "left": left, "right": left + size_w}


def _band(start: torch.Tensor, stop: torch.Tensor, length: int) -> torch.Tensor:
    """Boolean [n, length]: True at positions start <= i < stop.

    Comparing positions equals the reference's clamped index list, because the
    band always overlaps the image, so clamping only repeats border positions
    the band already holds.
    """
    position = torch.arange(length, device=start.device).unsqueeze(0)
    return (position >= start.unsqueeze(1)) & (position < stop.unsqueeze(1))


def _apply_cutout(x: torch.Tensor, q: Params) -> torch.Tensor:
    rows = _band(q["top"], q["bottom"], x.shape[2])
    cols = _band(q["left"], q["right"], x.shape[3])
    keep = ~(rows.unsqueeze(2) & cols.unsqueeze(1))
    return x * keep.unsqueeze(1).to(x.dtype)


AUGMENT_OPS: dict[str, tuple[AugmentOp, ...]] = {
    "color": (
        AugmentOp(_sample_brightness, _apply_brightness),
        AugmentOp(_sample_saturation, _apply_saturation),
        AugmentOp(_sample_contrast, _apply_contrast),
    ),
    "crop": (AugmentOp(_sample_crop, _apply_crop),),
    "cutout": (AugmentOp(_sample_cutout, _apply_cutout),),
    "flip": (AugmentOp(_sample_flip, _apply_flip),),
    "scale": (AugmentOp(_sample_scale, _apply_affine),),
    "rotate": (AugmentOp(_sample_rotate, _apply_affine),),
}
NO_AUGMENTATION = ("", "none", "None")


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split a strategy like 'color_crop_cutout' into op groups; '' or 'none' means no DSA."""
    if strategy in NO_AUGMENTATION:
        return ()
    groups = tuple(strategy.split("_"))
    unknown = [g for g in groups if g not in AUGMENT_OPS]
    if unknown:
        raise ConfigError(
            f"unknown DSA op {unknown[0]!r} in --dsa_strategy {strategy!r}; "
            f"valid ops: {', '.join(AUGMENT_OPS)} (joined by '_'), or 'none'"
        )
    return groups


Draw = list[tuple[AugmentOp, Params]]


@dataclass
class DSA:
    """A DSA strategy bound to its own random streams.

    ``siamese(*batches)`` gives every image of every batch one shared parameter
    set (and, in single mode, the same op group); ``per_image(x)`` draws one
    parameter set per image, as evaluation training does.
    """

    strategy: str
    choice_generator: torch.Generator
    value_generator: torch.Generator
    param: ParamDiffAug = field(default_factory=ParamDiffAug)

    def __post_init__(self) -> None:
        self.groups = parse_strategy(self.strategy)
        if self.param.aug_mode not in ("S", "M"):
            raise ConfigError(f"unknown DSA mode {self.param.aug_mode!r}; use 'S' (single) or 'M' (multiple)")

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    def _chosen_groups(self) -> tuple[str, ...]:
        if self.param.aug_mode == "M":
            return self.groups
        pick = torch.randint(len(self.groups), (1,), generator=self.choice_generator)
        return (self.groups[int(pick)],)

    def draw(self, n: int, height: int, width: int) -> Draw:
        """Parameters for ``n`` images (n = 1 broadcasts over any batch)."""
        ctx = DrawContext(n, height, width, self.param, self.value_generator)
        return [
            (op, op.sample(ctx))
            for group in self._chosen_groups()
            for op in AUGMENT_OPS[group]
        ]

    @staticmethod
    def apply(x: torch.Tensor, draw: Draw) -> torch.Tensor:
        for op, params in draw:
            x = op.apply(x, params)
        return x

    def siamese_draw(self, height: int, width: int) -> Draw:
        """One parameter set for every image of a Siamese pair of batches (none without DSA)."""
        return self.draw(1, height, width) if self.enabled else []

    def siamese(self, *batches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return batches
        draw = self.draw(1, *batches[0].shape[2:])
        return tuple(self.apply(x, draw) for x in batches)

    def per_image(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        return self.apply(x, self.draw(x.shape[0], *x.shape[2:]))


def decode_mosaic(images: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Multi-formation decoding: each image's 4 quadrants, upsampled x2 (bilinear).

    Output order follows the reference: all top-left quadrants, then
    bottom-left, top-right, bottom-right, so n images give 4n. With ``groups``
    > 1 the images are that many equal consecutive groups (classes), each
    decoded in that order and kept together: group k's 4n images come k-th.
    """
    stored = images.view(groups, -1, *images.shape[1:])
    h, w = images.shape[2] // 2, images.shape[3] // 2
    quadrants = torch.stack([stored[..., :h, :w], stored[..., h:, :w], stored[..., :h, w:], stored[..., h:, w:]],
                            dim=1)
    return F.interpolate(quadrants.flatten(0, 2), scale_factor=2, mode="bilinear", align_corners=False)


def siamese_by_class(draws: Sequence[Draw], reals: Sequence[torch.Tensor],
                     syns: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Class k's real and synthetic images under class k's own Siamese draw, for every k.

    Classes that drew the same ops are transformed in one batch, each image with
    its class's parameters (an op applies per-image parameters as it applies a
    broadcast one), so the result is each class's ``DSA.siamese`` of its own
    pair: a few batched ops per op group instead of per class.
    """
    groups: dict[tuple[AugmentOp, ...], list[int]] = {}
    for k, draw in enumerate(draws):
        groups.setdefault(tuple(op for op, _ in draw), []).append(k)
    real_out, syn_out = list(reals), list(syns)
    for ops, members in groups.items():
        if not ops:
            continue
        owners = [*members, *members]
        pieces = [*(reals[k] for k in members), *(syns[k] for k in members)]
        batch = torch.cat(pieces)
        for position, op in enumerate(ops):
            names = draws[members[0]][position][1]
            params = {name: torch.cat([draws[k][position][1][name].expand(len(piece), *names[name].shape[1:])
                                       for k, piece in zip(owners, pieces)]) for name in names}
            batch = op.apply(batch, params)
        augmented = batch.split([len(piece) for piece in pieces])
        for k, real, syn in zip(members, augmented[:len(members)], augmented[len(members):]):
            real_out[k], syn_out[k] = real, syn
    return real_out, syn_out


def decode_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels matching ``decode_mosaic``: the whole label vector repeated 4 times."""
    return labels.repeat(4)


def encode_mosaic(top_left: torch.Tensor, bottom_left: torch.Tensor,
                  top_right: torch.Tensor, bottom_right: torch.Tensor) -> torch.Tensor:
    """Build mosaics from four full-size batches, each downscaled x0.5 (bilinear)."""
    halves = F.interpolate(
        torch.cat([top_left, bottom_left, top_right, bottom_right]),
        scale_factor=0.5, mode="bilinear", align_corners=False,
    )
    tl, bl, tr, br = halves.chunk(4)
    return torch.cat([torch.cat([tl, bl], dim=2), torch.cat([tr, br], dim=2)], dim=3)
