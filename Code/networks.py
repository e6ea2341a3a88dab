"""The networks that are distilled for and evaluated on, looked up by name.

This file has one job: turn a model name (``--model``, an eval-pool entry) into a
freshly initialised ``nn.Module``. The architectures follow the "Dataset
Condensation" reference networks that BACON builds on, and every one of them is
split into ``features`` (an ``nn.Sequential``) and ``classifier`` so the
distillation loop can take embeddings from any of them the same way.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Mapping, NamedTuple, Sequence, TypeVar

import torch
from torch import nn

from errors import ConfigError

T = TypeVar("T")
Size = tuple[int, int]  # (height, width) of an image or feature map

# The first conv of a one-channel (MNIST-like) network gets two extra pixels of
# padding, which grows 28 px inputs to the 32 px geometry of the colour datasets.
GRAYSCALE_EXTRA_PADDING = 2


class Network(nn.Module):
    """Feature extractor plus classifier, so every model embeds and classifies alike."""

    def __init__(self, features: nn.Sequential, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def embed(self, x: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """Flattened output of ``features[:last]``; the reference's ``embed_channel_avg``."""
        return torch.flatten(self.features[:last](x), 1)

    def embed_is_full(self, last: int | None) -> bool:
        """Whether ``embed(x, last)`` is the classifier's input, so logits can reuse it."""
        return last is None or last >= len(self.features)


class Swish(nn.Module):
    """x * sigmoid(x); a module so it can sit in an ``nn.Sequential``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def _choose(table: Mapping[str, T], name: str, what: str) -> T:
    """Look ``name`` up in ``table``; a typo becomes a one-line ConfigError."""
    if name not in table:
        raise ConfigError(f"unknown {what} '{name}'; valid {what}s: {', '.join(sorted(table))}")
    return table[name]


# Norm builders take (channels, feature-map size) and return the layers to insert:
# LayerNorm needs the size, and 'none' inserts nothing. 'instancenorm' is a
# GroupNorm with one group per channel, as in the reference (affine, batch-size free).
_NORMS: dict[str, Callable[[int, Size], list[nn.Module]]] = {
    "none": lambda c, size: [],
    "instancenorm": lambda c, size: [nn.GroupNorm(c, c, affine=True)],
    "groupnorm": lambda c, size: [nn.GroupNorm(4, c, affine=True)],
    "batchnorm": lambda c, size: [nn.BatchNorm2d(c, affine=True)],
    "layernorm": lambda c, size: [nn.LayerNorm([c, *size], elementwise_affine=True)],
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": partial(nn.ReLU, inplace=True),
    "sigmoid": nn.Sigmoid,
    "leakyrelu": partial(nn.LeakyReLU, negative_slope=0.01),
    "swish": Swish,
}

class _HalveByAveraging(torch.autograd.Function):
    """2x2 average pooling, stride 2, of an NCHW tensor with even sides, in two passes over memory.

    PyTorch's CPU ``avg_pool2d`` visits every window element by element (and
    its backward scatters into a zeroed gradient), which makes pooling a large
    share of a CPU training step. Adding row pairs, then column pairs, and
    spreading the gradient with broadcast copies are whole-tensor passes the
    vectorised kernels run at memory speed (figures: docs/benchmarks.md). The
    values are the same averages, summed in another order.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        *lead, height, width = x.shape
        rows = x.reshape(*lead, height // 2, 2 * width)
        pairs = rows[..., :width] + rows[..., width:]
        return (pairs[..., 0::2] + pairs[..., 1::2]).mul_(0.25)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        """Each gradient value, quartered, to its 2x2 window: doubled along its row, then each row doubled.
        Two copies, the second with whole rows innermost, rather than one copy into [.., h, 2, w, 2],
        whose innermost dimension of 2 copies far below memory bandwidth (figures: docs/benchmarks.md)."""
        *lead, height, width = grad.shape
        rows = (grad * 0.25).unsqueeze(-1).expand(*lead, height, width, 2).reshape(*lead, height, 2 * width)
        return rows.unsqueeze(-2).expand(*lead, height, 2, 2 * width).reshape(*lead, 2 * height, 2 * width)

    generate_vmap_rule = True


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, stride=2)``, computed by ``_HalveByAveraging`` where that pays: CPU tensors of
    even sides in contiguous NCHW. Elsewhere PyTorch's kernel runs: on odd sides and channels-last,
    and on GPUs, whose pooling kernel reads the input once where the two passes here launch four
    kernels and write an intermediate half the input's size."""

    def __init__(self) -> None:
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if halving_applies(x):
            return _HalveByAveraging.apply(x)
        return super().forward(x)


def halving_applies(x: torch.Tensor) -> bool:
    """Whether ``AvgPool2x2`` computes ``x``'s pooling with ``_HalveByAveraging``."""
    return x.device.type == "cpu" and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0 and x.is_contiguous()


_POOLS: dict[str, Callable[[], list[nn.Module]]] = {
    "none": lambda: [],
    "avgpooling": lambda: [AvgPool2x2()],
    "maxpooling": lambda: [nn.MaxPool2d(kernel_size=2, stride=2)],
}


class ConvSpec(NamedTuple):
    """One conv → norm → act → pool block of a plain convolutional stack."""

    out_channels: int
    kernel: int
    padding: int
    pool: str = "none"


def _conv_stack(
    channel: int, im_size: Size, specs: Sequence[ConvSpec], norm: str, act: str
) -> tuple[nn.Sequential, int]:
    """Build the blocks in ``specs``; return them and their flattened output size.

    The feature-map size is tracked while building because LayerNorm and the
    classifier need it before any data has been seen.
    """
    layers: list[nn.Module] = []
    in_channels, (h, w) = channel, im_size
    for index, spec in enumerate(specs):
        padding = spec.padding + (GRAYSCALE_EXTRA_PADDING if index == 0 and channel == 1 else 0)
        layers.append(nn.Conv2d(in_channels, spec.out_channels, spec.kernel, padding=padding))
        h, w = (n + 2 * padding - spec.kernel + 1 for n in (h, w))
        layers += _choose(_NORMS, norm, "norm")(spec.out_channels, (h, w))
        layers.append(_choose(_ACTIVATIONS, act, "activation")())
        pool = _choose(_POOLS, spec.pool, "pooling")()
        if pool:
            h, w = h // 2, w // 2
        layers += pool
        in_channels = spec.out_channels
    return nn.Sequential(*layers), in_channels * h * w


class ConvNet(Network):
    """The DC/DSA/DM default: ``net_depth`` blocks of 3×3 conv, norm, act, pool."""

    def __init__(
        self,
        channel: int,
        num_classes: int,
        net_width: int = 128,
        net_depth: int = 3,
        net_act: str = "relu",
        net_norm: str = "instancenorm",
        net_pooling: str = "avgpooling",
        im_size: Size = (32, 32),
    ) -> None:
        specs = [ConvSpec(net_width, 3, 1, net_pooling)] * net_depth
        features, num_feat = _conv_stack(channel, im_size, specs, net_norm, net_act)
        super().__init__(features, nn.Linear(num_feat, num_classes))


class MLP(Network):
    """Two hidden layers of 128 units on the flattened image."""

    def __init__(self, channel: int, num_classes: int, im_size: Size = (32, 32)) -> None:
        features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channel * im_size[0] * im_size[1], 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, 128),
            nn.ReLU(inplace=True),
        )
        super().__init__(features, nn.Linear(128, num_classes))


class LeNet(Network):
    """Two 5×5 conv blocks and a three-layer classifier."""

    def __init__(self, channel: int, num_classes: int, im_size: Size = (32, 32)) -> None:
        specs = [ConvSpec(6, 5, 0, "maxpooling"), ConvSpec(16, 5, 0, "maxpooling")]
        features, num_feat = _conv_stack(channel, im_size, specs, "none", "relu")
        classifier = nn.Sequential(
            nn.Linear(num_feat, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
        super().__init__(features, classifier)


_ALEXNET = [
    ConvSpec(128, 5, 2, "maxpooling"),
    ConvSpec(192, 5, 2, "maxpooling"),
    ConvSpec(256, 3, 1),
    ConvSpec(192, 3, 1),
    ConvSpec(192, 3, 1, "maxpooling"),
]

_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def _vgg_specs(cfg: Sequence[int | str]) -> list[ConvSpec]:
    """Translate a torchvision-style VGG config ('M' pools the preceding conv)."""
    specs: list[ConvSpec] = []
    for item in cfg:
        if item == "M":
            specs[-1] = specs[-1]._replace(pool="maxpooling")
        else:
            specs.append(ConvSpec(int(item), 3, 1))
    return specs


class PlainConvNet(Network):
    """Conv blocks from ``specs`` and one linear classifier: AlexNet and VGG11 (by their specs)."""

    def __init__(self, channel: int, num_classes: int, im_size: Size = (32, 32), *,
                 specs: Sequence[ConvSpec], norm: str) -> None:
        features, num_feat = _conv_stack(channel, im_size, specs, norm, "relu")
        super().__init__(features, nn.Linear(num_feat, num_classes))


class BasicBlock(nn.Module):
    """Two 3×3 convs with a residual connection (projected when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, size: Size) -> None:
        super().__init__()
        make_norm = _choose(_NORMS, norm, "norm")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.Sequential(*make_norm(planes, size))
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.Sequential(*make_norm(planes, size))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            projection = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            self.shortcut = nn.Sequential(projection, *make_norm(planes, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(Network):
    """ResNet-18 for 32 px images; ``norm='batchnorm'`` gives ResNet18BN."""

    def __init__(
        self,
        channel: int,
        num_classes: int,
        im_size: Size = (32, 32),
        norm: str = "instancenorm",
    ) -> None:
        make_norm = _choose(_NORMS, norm, "norm")
        stem_conv = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        stem = [stem_conv, *make_norm(64, im_size), nn.ReLU()]
        stages: list[nn.Module] = []
        in_planes, size = 64, im_size
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            size = ((size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
            first = BasicBlock(in_planes, planes, stride, norm, size)
            stages.append(nn.Sequential(first, BasicBlock(planes, planes, 1, norm, size)))
            in_planes = planes
        features = nn.Sequential(*stem, *stages, nn.AdaptiveAvgPool2d(1))
        super().__init__(features, nn.Linear(512, num_classes))


def _convnet_variants() -> dict[str, Callable[..., Network]]:
    """The reference's ConvNet ablation names, each one ConvNet setting changed."""
    settings: dict[str, dict[str, object]] = {"ConvNet": {}, "ConvNet_GBN": {}}
    settings |= {f"ConvNetD{depth}": {"net_depth": depth} for depth in (1, 2, 3, 4)}
    settings |= {f"ConvNetW{width}": {"net_width": width} for width in (32, 64, 128, 256)}
    acts = {"AS": "sigmoid", "AR": "relu", "AL": "leakyrelu", "ASwish": "swish"}
    norms = {
        "NN": "none", "BN": "batchnorm", "LN": "layernorm", "IN": "instancenorm", "GN": "groupnorm",
    }
    poolings = {"NP": "none", "MP": "maxpooling", "AP": "avgpooling"}
    settings |= {f"ConvNet{suffix}": {"net_act": act} for suffix, act in acts.items()}
    settings |= {f"ConvNet{suffix}": {"net_norm": norm} for suffix, norm in norms.items()}
    settings |= {f"ConvNet{suffix}": {"net_pooling": pool} for suffix, pool in poolings.items()}
    return {name: partial(ConvNet, **kwargs) for name, kwargs in settings.items()}


NETWORKS: dict[str, Callable[..., Network]] = {
    **_convnet_variants(),
    "MLP": MLP,
    "LeNet": LeNet,
    "AlexNet": partial(PlainConvNet, specs=_ALEXNET, norm="none"),
    "AlexNetBN": partial(PlainConvNet, specs=_ALEXNET, norm="batchnorm"),
    "VGG11": partial(PlainConvNet, specs=_vgg_specs(_VGG11), norm="instancenorm"),  # instance norm, as the reference
    "VGG11BN": partial(PlainConvNet, specs=_vgg_specs(_VGG11), norm="batchnorm"),
    "ResNet18": ResNet18,
    "ResNet18BN": partial(ResNet18, norm="batchnorm"),
}


def model_names() -> list[str]:
    """Registered model names, sorted for help texts and error messages."""
    return sorted(NETWORKS)


_NORM_TYPES = (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)


def has_batch_norm(model: str) -> bool:
    """Whether ``model`` normalises with batch statistics (built on the meta device: no memory, no draws)."""
    with torch.device("meta"):
        net = _choose(NETWORKS, model, "model")(3, 2, im_size=(32, 32))
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())


@torch.no_grad()
def activation_sizes(model: str, channel: int, im_size: Size) -> tuple[int, int]:
    """Elements one image makes in a forward of ``model``'s feature extractor: the sum over every
    layer's output (what a backward keeps) and the largest one (what a forward without gradient
    holds at a time, next to its input). Built and run on the meta device: no memory, no draws."""
    with torch.device("meta"):
        net = _choose(NETWORKS, model, "model")(channel, 2, im_size=tuple(im_size))
        sizes: list[int] = []
        leaves = [m for m in net.features.modules() if not list(m.children())]
        handles = [m.register_forward_hook(lambda m, i, out: sizes.append(out.numel())) for m in leaves]
        net.features(torch.empty(1, channel, *im_size))
    for handle in handles:
        handle.remove()
    return sum(sizes), max(sizes)


@torch.no_grad()
def init_parameters_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw PyTorch's default initialisation from ``generator`` instead of the global RNG.

    Conv and linear layers get exactly the draws their ``reset_parameters`` would
    make (kaiming_uniform_(a=sqrt(5)) weights, U(±1/sqrt(fan_in)) biases); norm
    layers hold no randomness and are reset (which also fixes BatchNorm's running
    statistics). Any other layer with parameters is refused rather than left with
    global-RNG draws that would break reproducibility.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1 / math.sqrt(layer.weight[0].numel())
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif isinstance(layer, _NORM_TYPES):
            layer.reset_parameters()
        elif any(True for _ in layer.parameters(recurse=False)):
            raise TypeError(f"init_parameters_ cannot initialise {type(layer).__name__}")
    return module


def get_network(
    model: str,
    channel: int,
    num_classes: int,
    im_size: Size = (32, 32),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Network:
    """Build ``model`` on ``device``; with a CPU ``generator`` its weights are reproducible.

    With a generator the network is built on the meta device first, so PyTorch's
    default init never draws from (and never advances) the global RNG.
    """
    factory = _choose(NETWORKS, model, "model")
    if generator is None:
        return factory(channel, num_classes, im_size=tuple(im_size)).to(device)
    with torch.device("meta"):
        net = factory(channel, num_classes, im_size=tuple(im_size))
    return init_parameters_(net.to_empty(device="cpu"), generator).to(device)


_EVAL_POOLS: dict[str, list[str]] = {
    "M": ["MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"],
    "W": ["ConvNetW32", "ConvNetW64", "ConvNetW128", "ConvNetW256"],
    "D": ["ConvNetD1", "ConvNetD2", "ConvNetD3", "ConvNetD4"],
    "A": ["ConvNetAS", "ConvNetAR", "ConvNetAL", "ConvNetASwish"],
    "P": ["ConvNetNP", "ConvNetMP", "ConvNetAP"],
    "N": ["ConvNetNN", "ConvNetBN", "ConvNetLN", "ConvNetIN", "ConvNetGN"],
}
_SELF_MODES = ("S", "SS")

EVAL_MODES: tuple[str, ...] = (*_EVAL_POOLS, *_SELF_MODES)


def get_eval_pool(eval_mode: str, model: str, model_eval: str | None = None) -> list[str]:
    """Names of the networks a distilled set is evaluated on (``--eval_mode``).

    The self modes evaluate on ``model_eval`` when given (the reference passes
    the distilled model there), otherwise on the distilled ``model`` itself.
    """
    if eval_mode in _SELF_MODES:
        return [model_eval if model_eval is not None else model]
    if eval_mode not in _EVAL_POOLS:
        valid = ", ".join(EVAL_MODES)
        raise ConfigError(f"unknown eval mode '{eval_mode}'; valid eval modes: {valid}")
    return list(_EVAL_POOLS[eval_mode])
