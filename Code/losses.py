"""Feature-matching losses between real and synthetic images, for many classes at once.

A loss receives, for each of K classes, the moments of its real images'
features (mean and unbiased standard deviation over the class's real batch,
without gradient) and the mean feature of its synthetic images, and returns a
``MatchLoss``: the per-class totals to minimise and the per-class unweighted
terms for logging and the NaN watch. Every reduction runs over the feature
axis of one class, so a class's loss depends on its own rows only: K classes
computed together give each the loss it gets alone (to rounding).

A new matching method is one ``MatchingLoss`` here (its function and the names
of the terms it reports) plus one entry in ``methods.METHODS``; the loop, the
log and the NaN watch take the term names from it.

Everything is computed in float32 whatever precision produced the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
TV_WEIGHT, CLIP_WEIGHT = 0.8, 0.2


@dataclass(frozen=True)
class FeatureMoments:
    """Per class, the mean and the unbiased standard deviation of its features: [K, D] each."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor, counts: Sequence[int]) -> FeatureMoments:
        """Moments of ``features`` [sum(counts), D], whose rows are ``counts[k]`` rows of class k in turn.

        Equal counts (every published dataset) reduce in one batched pass; unequal ones (classes
        smaller than the real batch) one class at a time.
        """
        features = features.float()
        if len(set(counts)) == 1:
            per_class = features.view(len(counts), counts[0], -1)
            return cls(per_class.mean(dim=1), per_class.std(dim=1))
        pieces = features.split(list(counts))
        return cls(torch.stack([p.mean(dim=0) for p in pieces]), torch.stack([p.std(dim=0) for p in pieces]))


@dataclass
class MatchLoss:
    """Per class, the loss to minimise and its unweighted terms ([K] device tensors)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


@dataclass(frozen=True)
class MatchingLoss:
    """A matching loss and the names of the terms it reports."""

    function: Callable[[FeatureMoments, torch.Tensor], MatchLoss]
    terms: tuple[str, ...]

    def __call__(self, real: FeatureMoments, syn_mean: torch.Tensor) -> MatchLoss:
        return self.function(real, syn_mean.float())


def gaussian_nll(real: FeatureMoments, syn_mean: torch.Tensor) -> torch.Tensor:
    """-sum_j log N(mu_syn_j; mu_real_j, s_j) with s_j = exp(std_real_j), in log space.

    The reference evaluates the pdf and then its log, which underflows to
    log(0) = -inf once the means are a few dozen scales apart; expanding the
    log analytically keeps the same value finite: log(sqrt(2 pi) s) = log
    sqrt(2 pi) + std, and ((mu_s - mu_r) / s)^2 = ((mu_s - mu_r) exp(-std))^2
    where exp(-std) <= 1 cannot overflow.
    """
    z = (syn_mean - real.mean) * torch.exp(-real.std)
    return (LOG_SQRT_2PI + real.std + 0.5 * z.square()).sum(dim=-1)


def total_variation(real: FeatureMoments, syn_mean: torch.Tensor) -> torch.Tensor:
    """The prior term: total variation distance between the mean features."""
    return 0.5 * (syn_mean - real.mean).abs().sum(dim=-1)


def clip_distance(p_syn: torch.Tensor, p_real: torch.Tensor) -> torch.Tensor:
    """The reference's clip function of probability vectors (the last axis).

    u = (mean(p_syn) - mean(p_real)) / std(p_real), penalised outside [0, 1].
    The denominator is floored at the smallest normal float so that a flat
    p_real (std 0) gives 0 rather than 0/0.
    """
    spread = p_real.std(dim=-1).clamp_min(torch.finfo(p_real.dtype).tiny)
    u = (p_syn.mean(dim=-1) - p_real.mean(dim=-1)) / spread
    return (u - u.clamp(0.0, 1.0)).square()


def clip_term(real: FeatureMoments, syn_mean: torch.Tensor) -> torch.Tensor:
    """The clip term on the softmaxed mean features.

    Softmax entries always average to 1/D, so the numerator is zero up to
    rounding and the term is ~0 by construction; it is kept for fidelity.
    """
    return clip_distance(F.softmax(syn_mean, dim=-1), F.softmax(real.mean, dim=-1))


def bacon(real: FeatureMoments, syn_mean: torch.Tensor) -> MatchLoss:
    """BACON: Gaussian likelihood + 0.8 total-variation prior + 0.2 clip term."""
    nll, tv, clip = gaussian_nll(real, syn_mean), total_variation(real, syn_mean), clip_term(real, syn_mean)
    return MatchLoss(nll + TV_WEIGHT * tv + CLIP_WEIGHT * clip, {"nll": nll, "tv": tv, "clip": clip})


def mean_feature_distance(real: FeatureMoments, syn_mean: torch.Tensor) -> MatchLoss:
    """IDM and DM: squared Euclidean distance between the mean features."""
    distance = (real.mean - syn_mean).square().sum(dim=-1)
    return MatchLoss(distance, {"mean_distance": distance})


BACON_LOSS = MatchingLoss(bacon, ("nll", "tv", "clip"))
MEAN_DISTANCE_LOSS = MatchingLoss(mean_feature_distance, ("mean_distance",))
