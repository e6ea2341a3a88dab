"""DSA ops, Siamese versus per-image parameters, gradients, and multi-formation."""

import pytest
import torch

from augment import (AUGMENT_OPS, DSA, DrawContext, ParamDiffAug, decode_labels, decode_mosaic, encode_mosaic,
                     parse_strategy)
from errors import ConfigError

ALL_OPS = "color_crop_cutout_flip_scale_rotate"


def make_dsa(strategy: str = ALL_OPS, seed: int = 0, mode: str = "S") -> DSA:
    return DSA(strategy, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000),
               ParamDiffAug(aug_mode=mode))


def images(n: int = 6, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def draw_one(group: str, n: int, size: int = 16, seed: int = 0) -> list:
    ctx = DrawContext(n, size, size, ParamDiffAug(), torch.Generator().manual_seed(seed))
    return [(op, op.sample(ctx)) for op in AUGMENT_OPS[group]]


@pytest.mark.parametrize("group", list(AUGMENT_OPS))
def test_siamese_gives_every_image_of_both_batches_the_same_parameters(group: str) -> None:
    picture = images(1)
    real, syn = make_dsa(group, mode="M").siamese(picture.expand(5, -1, -1, -1), picture.expand(3, -1, -1, -1))
    assert torch.equal(real, real[:1].expand_as(real))
    assert torch.equal(syn, real[:3])


@pytest.mark.parametrize("group", ["crop", "cutout", "scale", "rotate", "color"])
def test_per_image_mode_draws_parameters_per_image(group: str) -> None:
    batch = images(1).expand(8, -1, -1, -1)
    out = make_dsa(group, mode="M").per_image(batch)
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 8))


@pytest.mark.parametrize("group", list(AUGMENT_OPS))
def test_every_op_is_differentiable_with_respect_to_the_images(group: str) -> None:
    x = images().requires_grad_(True)
    make_dsa(group, mode="M").per_image(x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_generators_give_the_same_augmentation_and_global_rng_is_untouched() -> None:
    state = torch.get_rng_state()
    first = make_dsa(seed=3).per_image(images())
    second = make_dsa(seed=3).per_image(images())
    assert torch.equal(first, second)
    assert not torch.equal(first, make_dsa(seed=4).per_image(images()))
    assert torch.equal(state, torch.get_rng_state())


def test_single_mode_applies_one_whole_group_and_multiple_mode_all() -> None:
    groups = {tuple(ops): name for name, ops in AUGMENT_OPS.items()}
    single = make_dsa(mode="S")
    seen = {groups[tuple(op for op, _ in single.draw(1, 8, 8))] for _ in range(60)}
    assert seen == set(AUGMENT_OPS)
    every_op = [op for ops in AUGMENT_OPS.values() for op in ops]
    assert [op for op, _ in make_dsa(mode="M").draw(1, 8, 8)] == every_op


def test_crop_is_an_integer_translation_with_zero_fill() -> None:
    x = images(1, 1, 8)
    [(op, _)] = draw_one("crop", 1)
    params = {"dy": torch.tensor([2]), "dx": torch.tensor([-1])}
    expected = torch.zeros_like(x)
    expected[:, :, :6, 1:] = x[:, :, 2:, :7]
    assert torch.equal(op.apply(x, params), expected)


@pytest.mark.parametrize("size, shift", [(28, 4), (32, 4), (64, 8)])
def test_crop_shift_range_follows_the_reference(size: int, shift: int) -> None:
    [(op, params)] = draw_one("crop", 4000, size)
    assert params["dy"].min() == -shift and params["dy"].max() == shift


@pytest.mark.parametrize("size, side", [(28, 14), (32, 16)])
def test_cutout_zeroes_a_square_of_half_the_side(size: int, side: int) -> None:
    [(op, _)] = draw_one("cutout", 1, size)
    centred = {"top": torch.tensor([size // 4]), "bottom": torch.tensor([size // 4 + side]),
               "left": torch.tensor([size // 4]), "right": torch.tensor([size // 4 + side])}
    out = op.apply(torch.ones(1, 2, size, size), centred)
    assert (out == 0).sum() == 2 * side * side


def test_colour_ops_brightness_shifts_saturation_keeps_grey_contrast_keeps_mean() -> None:
    brightness, saturation, contrast = AUGMENT_OPS["color"]
    x = images(2, 1)
    assert torch.allclose(brightness.apply(x, {"shift": torch.tensor([0.3, -0.2])}),
                          x + torch.tensor([0.3, -0.2]).view(2, 1, 1, 1))
    assert torch.allclose(saturation.apply(x, {"factor": torch.tensor([1.7, 0.1])}), x)
    out = contrast.apply(x, {"factor": torch.tensor([1.4, 0.6])})
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)


def test_flip_mirrors_horizontally_or_keeps() -> None:
    [(op, _)] = draw_one("flip", 2)
    x = images(2)
    out = op.apply(x, {"flip": torch.tensor([True, False])})
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])


def test_identity_affine_leaves_the_image_unchanged() -> None:
    [(op, _)] = draw_one("scale", 1)
    x = images(2)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    assert torch.allclose(op.apply(x, {"theta": identity}), x, atol=1e-6)


def test_parameter_ranges_follow_the_reference() -> None:
    ctx = DrawContext(5000, 8, 8, ParamDiffAug(), torch.Generator().manual_seed(0))
    scale = AUGMENT_OPS["scale"][0].sample(ctx)["theta"]
    assert scale[:, 0, 0].min() >= 1 / 1.2 and scale[:, 0, 0].max() <= 1.2
    rotation = AUGMENT_OPS["rotate"][0].sample(ctx)["theta"]
    angle = torch.atan2(rotation[:, 1, 0], rotation[:, 0, 0])
    assert angle.abs().max() <= torch.deg2rad(torch.tensor(15.0)) + 1e-6
    assert AUGMENT_OPS["color"][1].sample(ctx)["factor"].max() <= 2.0
    assert AUGMENT_OPS["color"][2].sample(ctx)["factor"].min() >= 0.5


def test_strategy_parsing() -> None:
    assert parse_strategy(ALL_OPS) == ("color", "crop", "cutout", "flip", "scale", "rotate")
    assert parse_strategy("none") == ()
    x = images()
    assert torch.equal(make_dsa("none").per_image(x), x)
    with pytest.raises(ConfigError, match="unknown DSA op 'blur'"):
        parse_strategy("color_blur")


def test_mosaic_round_trip_and_quadrant_order() -> None:
    quadrants = [torch.full((3, 1, 8, 8), value) for value in (1.0, 2.0, 3.0, 4.0)]
    mosaic = encode_mosaic(*quadrants)
    assert mosaic.shape == (3, 1, 8, 8)
    assert torch.equal(mosaic[:, :, :4, :4], torch.full((3, 1, 4, 4), 1.0))  # top-left
    assert torch.equal(mosaic[:, :, 4:, :4], torch.full((3, 1, 4, 4), 2.0))  # bottom-left
    assert torch.equal(mosaic[:, :, :4, 4:], torch.full((3, 1, 4, 4), 3.0))  # top-right
    decoded = decode_mosaic(mosaic)
    assert decoded.shape == (12, 1, 8, 8)
    for k, value in enumerate((1.0, 2.0, 3.0, 4.0)):
        assert torch.allclose(decoded[3 * k:3 * (k + 1)], torch.full((3, 1, 8, 8), value))


def test_decoding_smooth_images_recovers_them_approximately() -> None:
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(2, 3, 16, 16)
    decoded = decode_mosaic(encode_mosaic(ramp, ramp, ramp, ramp))
    assert (decoded - ramp.repeat(4, 1, 1, 1)).abs().max() < 0.05


def test_decoded_labels_repeat_the_whole_vector() -> None:
    assert decode_labels(torch.tensor([0, 0, 1, 1])).tolist() == [0, 0, 1, 1] * 4
