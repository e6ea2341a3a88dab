"""Feature-matching losses between a real batch and a synthetic batch.

Each loss takes the embeddings of the real images (no gradient) and of the
synthetic images of ONE class and returns a ``MatchLoss``: the scalar to
minimise and its unweighted terms for logging. A new matching method is a new
function with this signature plus an entry in ``methods.METHODS``.

Everything is computed in float32 whatever precision produced the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
TV_WEIGHT, CLIP_WEIGHT = 0.8, 0.2


@dataclass
class MatchLoss:
    """The loss to minimise and its unweighted terms (device tensors, read at log points)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def gaussian_nll(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """-sum_j log N(mu_syn_j; mu_real_j, s_j) with s_j = exp(std_real_j), in log space.

    The reference evaluates the pdf and then its log, which underflows to
    log(0) = -inf once the means are a few dozen scales apart; expanding the
    log analytically keeps the same value finite: log(sqrt(2 pi) s) = log
    sqrt(2 pi) + std, and ((mu_s - mu_r) / s)^2 = ((mu_s - mu_r) exp(-std))^2
    where exp(-std) <= 1 cannot overflow.
    """
    sigma = real.std(dim=0)
    z = (syn.mean(dim=0) - real.mean(dim=0)) * torch.exp(-sigma)
    return (LOG_SQRT_2PI + sigma + 0.5 * z.square()).sum()


def total_variation(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """The prior term: total variation distance between the mean features."""
    return 0.5 * (syn.mean(dim=0) - real.mean(dim=0)).abs().sum()


def clip_distance(p_syn: torch.Tensor, p_real: torch.Tensor) -> torch.Tensor:
    """The reference's clip function of two probability vectors.

    u = (mean(p_syn) - mean(p_real)) / std(p_real), penalised outside [0, 1].
    The denominator is floored at the smallest normal float so that a flat
    p_real (std 0) gives 0 rather than 0/0.
    """
    u = (p_syn.mean() - p_real.mean()) / p_real.std().clamp_min(torch.finfo(p_real.dtype).tiny)
    return (u - u.clamp(0.0, 1.0)).square()


def clip_term(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """The clip term on the softmaxed mean features.

    Softmax entries always average to 1/D, so the numerator is zero up to
    rounding and the term is ~0 by construction; it is kept for fidelity.
    """
    return clip_distance(F.softmax(syn.mean(dim=0), dim=-1), F.softmax(real.mean(dim=0), dim=-1))


def bacon_loss(real: torch.Tensor, syn: torch.Tensor) -> MatchLoss:
    """BACON: Gaussian likelihood + 0.8 total-variation prior + 0.2 clip term."""
    real, syn = real.float(), syn.float()
    nll, tv, clip = gaussian_nll(real, syn), total_variation(real, syn), clip_term(real, syn)
    return MatchLoss(nll + TV_WEIGHT * tv + CLIP_WEIGHT * clip, {"nll": nll, "tv": tv, "clip": clip})


def mean_feature_distance(real: torch.Tensor, syn: torch.Tensor) -> MatchLoss:
    """IDM and DM: squared Euclidean distance between the mean features."""
    real, syn = real.float(), syn.float()
    distance = (real.mean(dim=0) - syn.mean(dim=0)).square().sum()
    return MatchLoss(distance, {"mean_distance": distance})
