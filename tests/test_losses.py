"""The matching losses against values computed by hand from docs/algorithm.md's formulas, one class at a
time and many classes at once."""

import math

import pytest
import torch

from losses import (BACON_LOSS, MEAN_DISTANCE_LOSS, FeatureMoments, MatchLoss, clip_distance, clip_term,
                    gaussian_nll, total_variation)


def moments(real: torch.Tensor) -> FeatureMoments:
    """The moments of one class's real features."""
    return FeatureMoments.of(real, [len(real)])


def syn_mean(syn: torch.Tensor) -> torch.Tensor:
    """One class's mean synthetic feature, as a batch of one class."""
    return syn.mean(dim=0, keepdim=True)


def bacon_loss(real: torch.Tensor, syn: torch.Tensor) -> MatchLoss:
    return BACON_LOSS(moments(real), syn_mean(syn))


def mean_feature_distance(real: torch.Tensor, syn: torch.Tensor) -> MatchLoss:
    return MEAN_DISTANCE_LOSS(moments(real), syn_mean(syn))


def reference_nll(real: torch.Tensor, syn: torch.Tensor) -> float:
    """The reference's -sum log pdf, evaluated naively in float64."""
    s = torch.exp(real.double().std(dim=0))
    diff = syn.double().mean(dim=0) - real.double().mean(dim=0)
    pdf = torch.exp(-0.5 * (diff / s) ** 2) / (math.sqrt(2 * math.pi) * s)
    return float(-torch.log(pdf).sum())


REAL = torch.tensor([[0.0, 0.0, 1.0], [2.0, 2.0, 1.0]])  # means 1, 1, 1; unbiased stds sqrt2, sqrt2, 0
SYN = torch.tensor([[1.0, 3.0, -1.0]])


def test_likelihood_matches_hand_computed_value() -> None:
    sigma = math.sqrt(2.0)
    by_hand = (3 * 0.5 * math.log(2 * math.pi) + 2 * sigma
               + 0.5 * (2.0 / math.exp(sigma)) ** 2 + 0.5 * (-2.0 / math.exp(0.0)) ** 2)
    assert gaussian_nll(moments(REAL), syn_mean(SYN)).item() == pytest.approx(by_hand, rel=1e-6)
    assert gaussian_nll(moments(REAL), syn_mean(SYN)).item() == pytest.approx(reference_nll(REAL, SYN), rel=1e-6)


def test_likelihood_is_finite_where_the_naive_log_pdf_underflows() -> None:
    real = torch.tensor([[0.0], [0.0]])
    syn = torch.tensor([[100.0]])  # 100 scales away: pdf = exp(-5000) = 0 in float64
    assert math.isinf(reference_nll(real, syn))
    value = gaussian_nll(moments(real), syn_mean(syn))
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(0.5 * math.log(2 * math.pi) + 0.5 * 100.0 ** 2, rel=1e-6)


def test_losses_and_gradients_stay_finite_on_extreme_features() -> None:
    real = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e4
    syn = (torch.randn(8, 32, generator=torch.Generator().manual_seed(1)) * 1e4 + 1e5).requires_grad_(True)
    loss = bacon_loss(real, syn).total
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(syn.grad).all()


def test_total_variation_is_half_the_l1_distance_of_means() -> None:
    assert total_variation(moments(REAL), syn_mean(SYN)).item() == pytest.approx(0.5 * (0 + 2 + 2))


def test_clip_term_is_zero_by_construction_on_features() -> None:
    real = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    syn = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    assert clip_term(moments(real), syn_mean(syn)).item() == pytest.approx(0.0, abs=1e-10)


def test_clip_distance_penalises_only_outside_unit_interval() -> None:
    p_real = torch.tensor([0.0, 1.0])  # mean 0.5, unbiased std 1/sqrt2
    inside = torch.tensor([0.6, 0.6])  # u = 0.1 * sqrt2, within [0, 1]
    above = torch.tensor([2.0, 2.0])  # u = 1.5 * sqrt2
    below = torch.tensor([0.0, 0.0])  # u = -0.5 * sqrt2
    assert clip_distance(inside, p_real).item() == pytest.approx(0.0)
    assert clip_distance(above, p_real).item() == pytest.approx((1.5 * math.sqrt(2) - 1) ** 2, rel=1e-6)
    assert clip_distance(below, p_real).item() == pytest.approx((0.5 * math.sqrt(2)) ** 2, rel=1e-6)


def test_clip_distance_of_flat_real_probabilities_is_zero_not_nan() -> None:
    flat = torch.full((5,), 0.2)
    assert clip_distance(flat, flat).item() == 0.0


def test_bacon_loss_weights_its_terms() -> None:
    real = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    syn = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    loss = bacon_loss(real, syn)
    terms = loss.terms
    assert set(terms) == {"nll", "tv", "clip"}
    assert loss.total.item() == pytest.approx((terms["nll"] + 0.8 * terms["tv"] + 0.2 * terms["clip"]).item())


def test_mean_feature_distance_is_squared_euclidean_distance_of_means() -> None:
    assert mean_feature_distance(REAL, SYN).total.item() == pytest.approx(0 + 4 + 4)


def test_losses_compute_in_float32_from_bfloat16_features() -> None:
    real = torch.randn(16, 8).bfloat16()
    syn = torch.randn(4, 8).bfloat16()
    assert bacon_loss(real, syn).total.dtype == torch.float32


def test_moments_of_many_classes_are_each_class_alone_with_equal_or_unequal_counts() -> None:
    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(4))
    for counts in ([4, 4, 4], [2, 7, 3]):
        together = FeatureMoments.of(features, counts)
        for k, piece in enumerate(features.split(counts)):
            torch.testing.assert_close(together.mean[k], piece.mean(dim=0))
            torch.testing.assert_close(together.std[k], piece.std(dim=0))


@pytest.mark.parametrize("loss", [BACON_LOSS, MEAN_DISTANCE_LOSS], ids=["bacon", "mean_distance"])
def test_a_class_gets_the_same_loss_among_many_as_alone(loss) -> None:
    """Every reduction runs over one class's features: the per-class values of K classes computed
    together are those of each class alone, to float32 rounding (a batched reduction may group the
    same sums differently: 1e-6 relative covers a few roundings)."""
    real = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(5))
    syn = torch.randn(3, 6, generator=torch.Generator().manual_seed(6))
    together = loss(FeatureMoments.of(real.flatten(0, 1), [8] * 3), syn)
    assert set(together.terms) == set(loss.terms) and together.total.shape == (3,)
    for k in range(3):
        alone = loss(moments(real[k]), syn[k:k + 1])
        torch.testing.assert_close(together.total[k:k + 1], alone.total, rtol=1e-6, atol=0)
        for name in loss.terms:
            torch.testing.assert_close(together.terms[name][k:k + 1], alone.terms[name], rtol=1e-6, atol=1e-12)
