"""Specification of networks.py: reference shapes, one embed contract, reproducible init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from errors import ConfigError
from networks import (
    EVAL_MODES,
    AvgPool2x2,
    NETWORKS,
    ConvNet,
    get_eval_pool,
    get_network,
    init_parameters_,
    model_names,
)
from rng import make_generator

# (channel, im_size) of MNIST-like and CIFAR-like inputs.
SHAPES = [(1, (28, 28)), (3, (32, 32))]


def _batch(channel: int, im_size: tuple[int, int]) -> torch.Tensor:
    return torch.rand(2, channel, *im_size, generator=torch.Generator().manual_seed(0))


def _num_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("channel", "im_size", "expected"), [(3, (32, 32), 320_010), (1, (28, 28), 317_706)]
)
def test_convnet_parameter_count_matches_reference(channel, im_size, expected):
    assert _num_params(get_network("ConvNet", channel, 10, im_size)) == expected


@pytest.mark.parametrize(("channel", "im_size"), SHAPES)
@pytest.mark.parametrize(
    ("model", "in_features"),
    [
        ("LeNet", 16 * 5 * 5),
        ("AlexNet", 192 * 4 * 4),
        ("VGG11", 512),
        ("ResNet18", 512),
        ("MLP", 128),
    ],
)
def test_classifier_input_sizes_match_reference(model, in_features, channel, im_size):
    net = get_network(model, channel, 10, im_size, generator=make_generator(0))
    first_linear = next(m for m in net.classifier.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == in_features


@pytest.mark.parametrize(("channel", "im_size"), SHAPES)
@pytest.mark.parametrize("model", sorted(NETWORKS))
def test_every_model_classifies_and_embeds_consistently(model, channel, im_size):
    net = get_network(model, channel, 10, im_size, generator=make_generator(0, model))
    x = _batch(channel, im_size)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (2, 10)
        depth = len(net.features)
        for last in (None, depth, 1000):
            assert net.embed_is_full(last)
            torch.testing.assert_close(net.classifier(net.embed(x, last)), logits)
        assert not net.embed_is_full(-1)
        assert not net.embed_is_full(depth - 1)


@pytest.mark.parametrize(("channel", "im_size"), SHAPES)
def test_convnet_embedding_sizes(channel, im_size):
    net = get_network("ConvNet", channel, 10, im_size, generator=make_generator(0))
    x = _batch(channel, im_size)
    assert net.embed(x, last=1000).shape == (2, 128 * 4 * 4)
    assert net.embed(x, last=-1).shape == (2, 128 * 8 * 8)  # the final AvgPool is dropped


def test_convnet_on_tiny_imagenet_size():
    net = get_network("ConvNet", 3, 200, (64, 64), generator=make_generator(0))
    assert net.classifier.in_features == 128 * 8 * 8
    assert net(_batch(3, (64, 64))).shape == (2, 200)


def test_convnet_variants_change_one_setting():
    assert len(get_network("ConvNetD4", 3, 10).features) == 4 * 4
    assert len(get_network("ConvNetNN", 3, 10).features) == 3 * 3
    assert get_network("ConvNetW32", 3, 10).features[0].out_channels == 32
    assert isinstance(get_network("ConvNetLN", 3, 10).features[1], nn.LayerNorm)
    assert isinstance(get_network("ConvNetMP", 3, 10).features[3], nn.MaxPool2d)
    assert _num_params(get_network("ConvNet_GBN", 3, 10)) == 320_010


def test_same_seed_same_parameters_different_seed_different():
    def params(seed: int) -> list[torch.Tensor]:
        net = get_network("ConvNet", 3, 10, generator=make_generator(seed, "net"))
        return list(net.parameters())

    first, again, other = params(1), params(1), params(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other) if a.std() > 0)


def test_generator_init_leaves_global_rng_untouched():
    before = torch.get_rng_state()
    get_network("ResNet18BN", 3, 10, generator=make_generator(0))
    assert torch.equal(before, torch.get_rng_state())


def test_init_replicates_pytorch_default_init():
    """Same seed in the global RNG and in the generator gives the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        default = ConvNet(3, 10)
    ours = init_parameters_(ConvNet(3, 10), torch.Generator().manual_seed(7))
    for a, b in zip(default.parameters(), ours.parameters()):
        assert torch.equal(a, b)


def test_init_draws_lie_within_fan_in_bound_and_norms_are_reset():
    net = get_network("ResNet18BN", 3, 10, generator=make_generator(3))
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(layer.weight[0].numel())
            for param in (p for p in (layer.weight, layer.bias) if p is not None):
                assert param.abs().max() <= bound
                assert param.abs().max() > 0.9 * bound
        elif isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
            assert torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
            assert torch.equal(layer.running_var, torch.ones_like(layer.running_var))


def test_init_refuses_layers_it_cannot_initialise():
    with pytest.raises(TypeError, match="Embedding"):
        init_parameters_(nn.Sequential(nn.Embedding(3, 2)), make_generator(0))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown model 'ConvNetXL'") as error:
        get_network("ConvNetXL", 3, 10)
    assert all(name in str(error.value) for name in model_names())


def test_unknown_layer_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="valid norms"):
        ConvNet(3, 10, net_norm="weightnorm")


@pytest.mark.parametrize("mode", EVAL_MODES)
def test_eval_pools_name_registered_models(mode):
    assert set(get_eval_pool(mode, "ConvNetBN")) <= set(NETWORKS)


def test_self_eval_modes_evaluate_the_distilled_model():
    assert get_eval_pool("S", "ConvNetBN") == ["ConvNetBN"]
    assert get_eval_pool("SS", "ConvNet", "ConvNet") == ["ConvNet"]
    assert get_eval_pool("M", "ConvNet")[0] == "MLP"


def test_unknown_eval_mode_lists_valid_modes():
    with pytest.raises(ConfigError, match="unknown eval mode 'Q'") as error:
        get_eval_pool("Q", "ConvNet")
    assert all(mode in str(error.value) for mode in EVAL_MODES)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 7, 6), (5, 2, 3, 4, 4)])
def test_fast_average_pooling_is_avg_pool2d(shape: tuple[int, ...]) -> None:
    """The same 2x2 averages and gradients as nn.AvgPool2d(2, 2), in float64 so that only the
    summation order could differ; odd sides (PyTorch's kernel) and extra leading dims (vmap) included."""
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    grad = torch.randn_like(nn.AvgPool2d(2, 2)(x.detach().flatten(0, -4)))
    ours, reference = AvgPool2x2()(x), nn.AvgPool2d(2, 2)(x.flatten(0, -4))
    torch.testing.assert_close(ours.flatten(0, -4), reference, rtol=0, atol=1e-15)
    (mine,) = torch.autograd.grad(ours.flatten(0, -4), x, grad)
    (theirs,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(AvgPool2x2(), (x.detach()[:1].requires_grad_(True),))


def test_fast_average_pooling_works_under_vmap_and_grad() -> None:
    """Stacked evaluation trains ConvNets with torch.func.vmap(grad(...)) through the pooling."""
    xs = torch.randn(3, 2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pooled = torch.func.vmap(AvgPool2x2())(xs)
    torch.testing.assert_close(pooled, nn.AvgPool2d(2, 2)(xs.flatten(0, 1)).view(3, 2, 4, 4, 4))
    grads = torch.func.vmap(torch.func.grad(lambda x: AvgPool2x2()(x).square().sum()))(xs)
    expected = torch.func.vmap(torch.func.grad(lambda x: nn.AvgPool2d(2, 2)(x).square().sum()))(xs)
    torch.testing.assert_close(grads, expected)
