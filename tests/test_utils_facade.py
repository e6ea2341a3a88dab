"""Code/utils.py offers the reference's public names with compatible signatures."""

import argparse
import inspect
from pathlib import Path

import pytest
import torch

import utils


REFERENCE_SIGNATURES = {  # the leading parameters the reference's scripts pass, in order
    "get_dataset": ("dataset", "data_path"),
    "get_network": ("model", "channel", "num_classes", "im_size"),
    "get_eval_pool": ("eval_mode", "model", "model_eval"),
    "DiffAugment": ("x", "strategy", "seed", "param"),
    "evaluate_synset": ("it_eval", "net", "images_train", "labels_train", "testloader", "args"),
    "epoch": ("mode", "dataloader", "net", "optimizer", "criterion", "args", "aug"),
    "number_sign_augment": ("image_syn", "label_syn"),
    "downscale": ("image_syn", "scale_factor"),
    "parser_bool": ("parser", "name"),
}


@pytest.mark.parametrize("name, leading", REFERENCE_SIGNATURES.items())
def test_reference_functions_take_the_reference_arguments(name: str, leading: tuple[str, ...]) -> None:
    parameters = tuple(inspect.signature(getattr(utils, name)).parameters)
    assert parameters[:len(leading)] == leading


def test_the_other_reference_names_are_offered() -> None:
    for name in ("ParamDiffAug", "get_time", "TensorDataset", "total_variation", "clip_function",
                 "negative_log_likelihood", "get_default_convnet_setting"):
        assert hasattr(utils, name), name


def test_seeded_diffaugment_pairs_real_and_synthetic_batches() -> None:
    picture = torch.rand(1, 3, 16, 16)
    strategy = "color_crop_cutout_flip_scale_rotate"
    real = utils.DiffAugment(picture.expand(4, -1, -1, -1), strategy, seed=7, param=utils.ParamDiffAug())
    syn = utils.DiffAugment(picture.expand(2, -1, -1, -1), strategy, seed=7, param=utils.ParamDiffAug())
    assert torch.equal(real[:2], syn)


def test_number_sign_augment_decodes_mosaics() -> None:
    images, labels = utils.number_sign_augment(torch.rand(4, 1, 28, 28), torch.tensor([0, 0, 1, 1]))
    assert images.shape == (16, 1, 28, 28) and labels.tolist() == [0, 0, 1, 1] * 4


def test_reference_loss_functions_take_syn_then_real() -> None:
    real, syn = torch.randn(32, 8), torch.randn(4, 8)
    probs_real, probs_syn = real.mean(0).softmax(-1), syn.mean(0).softmax(-1)
    assert torch.isfinite(utils.negative_log_likelihood(syn, real))
    assert utils.total_variation(syn, real) == utils.total_variation(real, syn)
    assert utils.clip_function(probs_syn, probs_real).abs() < 1e-8


def test_evaluate_synset_returns_fractions(image_folder: Path) -> None:
    loaded = utils.get_dataset("ImageFolder", str(image_folder))
    channel, im_size, num_classes, class_names, mean, std, dst_train, dst_test, testloader = loaded
    images, labels = dst_train.tensors
    args = argparse.Namespace(device="cpu", lr_net=0.01, epoch_eval_train=1, batch_train=8,
                              dsa_strategy="color_crop", dsa_param=utils.ParamDiffAug())
    net = utils.get_network("ConvNet", channel, num_classes, im_size)
    trained, acc_train, acc_test = utils.evaluate_synset(0, net, images, labels, testloader, args)
    trained.eval()
    with torch.no_grad():
        correct = sum(int((trained(x).argmax(1) == y).sum()) for x, y in testloader)
    assert acc_test == pytest.approx(correct / len(testloader.dataset))  # a fraction, of the trained net
    assert 0.0 <= acc_train <= 1.0


def test_parser_bool_gives_reference_flags() -> None:
    parser = argparse.ArgumentParser()
    utils.parser_bool(parser, "aug", False)
    assert parser.parse_args(["--aug"]).aug and not parser.parse_args(["--no_aug"]).aug
