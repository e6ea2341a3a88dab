"""The reference's public names, for researchers porting scripts written against it.

Nothing is implemented here: each name forwards to the focused module that
owns it, with the reference's signature and return values (accuracies as
fractions, ``get_dataset``'s 9-tuple). New code should import the modules
directly. Where the reference reseeded torch's global RNG (new networks,
seeded DSA), these wrappers use explicit generators instead; unseeded calls
draw from torch's default generator without reseeding it, as any PyTorch
module initialisation does.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from augment import DSA, ParamDiffAug, decode_labels, decode_mosaic
from data import get_dataset as load_dataset
from eval_augment import EvalAugmentation
from evaluation import EvalProtocol, train_on_set
from losses import FeatureMoments, clip_distance, gaussian_nll
from losses import total_variation as _total_variation
from networks import get_eval_pool, get_network
from rng import make_generator

__all__ = [
    "get_dataset", "get_network", "get_eval_pool", "ParamDiffAug", "DiffAugment", "evaluate_synset", "epoch",
    "number_sign_augment", "downscale", "get_time", "parser_bool", "TensorDataset", "total_variation",
    "clip_function", "negative_log_likelihood", "get_default_convnet_setting",
]


def get_dataset(dataset: str, data_path: str, batch_size: int = 256, subset: Any = None, args: Any = None) -> tuple:
    """(channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader)."""
    loaded = load_dataset(dataset, data_path)

    def as_tensor_dataset(split: Any) -> TensorDataset:
        return TensorDataset(split.fetch(torch.arange(len(split))), split.labels)

    dst_train, dst_test = as_tensor_dataset(loaded.train), as_tensor_dataset(loaded.test)
    testloader = DataLoader(dst_test, batch_size=batch_size, shuffle=False)
    return (loaded.channel, loaded.im_size, loaded.num_classes, loaded.class_names, loaded.mean, loaded.std,
            dst_train, dst_test, testloader)


def get_default_convnet_setting() -> tuple[int, int, str, str, str]:
    return 128, 3, "relu", "instancenorm", "avgpooling"


def default_generator(device: torch.device) -> torch.Generator:
    """torch's own generator of ``device``; a CUDA device without an index is the current one (under
    torchrun, rank k's ``cuda:k``), not the first."""
    if device.type != "cuda":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _unseeded_dsa(strategy: str, param: ParamDiffAug | None, device: torch.device) -> DSA:
    return DSA(strategy, torch.default_generator, default_generator(device), param or ParamDiffAug())


def DiffAugment(x: torch.Tensor, strategy: str = "", seed: int = -1, param: ParamDiffAug | None = None) -> torch.Tensor:
    """Seed -1: parameters per image. Any other seed: one parameter set for the batch,
    the same for every call with that seed (how the reference pairs real and synthetic)."""
    if seed == -1:
        return _unseeded_dsa(strategy, param, x.device).per_image(x)
    dsa = DSA(strategy, make_generator(seed, "dsa-choice"), make_generator(seed, "dsa-values", device=x.device),
              param or ParamDiffAug())
    return dsa.siamese(x)[0]


def number_sign_augment(image_syn: torch.Tensor, label_syn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-formation decoding: n mosaics -> 4n images and labels."""
    return decode_mosaic(image_syn), decode_labels(label_syn)


def downscale(image_syn: torch.Tensor, scale_factor: float) -> torch.Tensor:
    return F.interpolate(image_syn, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def epoch(mode: str, dataloader: DataLoader, net: nn.Module, optimizer: torch.optim.Optimizer | None,
          criterion: nn.Module, args: Any, aug: bool) -> tuple[float, float]:
    """One pass over ``dataloader``: (mean loss, accuracy as a fraction)."""
    net.train(mode == "train")
    device = next(net.parameters()).device
    dsa = _unseeded_dsa(args.dsa_strategy, getattr(args, "dsa_param", None), device) if aug else None
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in dataloader:
        images, labels = images.float().to(device), labels.long().to(device)
        if dsa is not None:
            images = dsa.per_image(images)
        with torch.set_grad_enabled(mode == "train"):
            output = net(images)
            loss = criterion(output, labels)
        if mode == "train":
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((output.argmax(dim=1) == labels).sum())
        seen += len(labels)
    return loss_sum / seen, correct / seen


def evaluate_synset(it_eval: int, net: nn.Module, images_train: torch.Tensor, labels_train: torch.Tensor,
                    testloader: DataLoader, args: Any, return_loss: bool = False, texture: bool = False) -> tuple:
    """Train ``net`` on the set with the reference protocol; (net, acc_train, acc_test) as fractions."""
    device = torch.device(getattr(args, "device", "cpu"))
    net = net.to(device)
    images, labels = images_train.to(device).float(), labels_train.to(device).long()
    param = getattr(args, "dsa_param", None) or ParamDiffAug()
    protocol = EvalProtocol(int(args.epoch_eval_train), int(args.batch_train), float(args.lr_net), args.dsa_strategy,
                            param)
    dsa = _unseeded_dsa(args.dsa_strategy, param, device)
    train_on_set(net, images, labels, protocol, default_generator(device), EvalAugmentation("dsa", dsa))
    criterion = nn.CrossEntropyLoss()
    loss_train, acc_train = epoch("test", DataLoader(TensorDataset(images, labels), batch_size=256), net, None,
                                  criterion, args, aug=False)
    loss_test, acc_test = epoch("test", testloader, net, None, criterion, args, aug=False)
    if return_loss:
        return net, acc_train, acc_test, loss_train, loss_test
    return net, acc_train, acc_test


def get_time() -> str:
    return time.strftime("[%Y-%m-%d %H:%M:%S]", time.localtime())


def parser_bool(parser: argparse.ArgumentParser, name: str, default: bool = False) -> None:
    """--name / --no_name flags, as the reference scripts declare their booleans."""
    group = parser.add_mutually_exclusive_group(required=False)
    group.add_argument("--" + name, dest=name, action="store_true")
    group.add_argument("--no_" + name, dest=name, action="store_false")
    parser.set_defaults(**{name: default})


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """0.5 * L1 distance of the batch means (symmetric in its arguments)."""
    return _total_variation(FeatureMoments.of(q, [len(q)]), p.float().mean(dim=0, keepdim=True))[0]


def clip_function(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The clip term of two probability vectors: x = softmax of the synthetic mean, y = of the real."""
    return clip_distance(x, y)


def negative_log_likelihood(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-sum log N(mean(x); mean(y), exp(std(y))), computed in log space: x = syn, y = real features."""
    return gaussian_nll(FeatureMoments.of(y, [len(y)]), x.float().mean(dim=0, keepdim=True))[0]
