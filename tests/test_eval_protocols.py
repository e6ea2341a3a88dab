"""Evaluation beyond the reference: label modes and their losses, switchable augmentation, and the
learning rate and epoch chosen on a validation split that never reads the test set."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from augment import DSA
from data import DataOptions, ImageSplit, get_dataset
from eval_augment import EvalAugmentation, Mix, cut_box
from eval_labels import LabelProtocol, batch_loss, batch_targets, logits_of_probabilities
from evaluation import EvalNet, EvalProtocol, train_on_set, train_together
from errors import ConfigError
from fair_evaluation import FairOptions, fingerprint
from fast_paths import FastPaths
from helpers import UPDATE_TOLERANCE, parameters_of, update_distances
from selection import check_epochs, choose, select, validation_split

CPU = torch.device("cpu")


def student_and_teacher(batch: int = 6, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, classes, generator=generator, requires_grad=False) * 3,
            torch.randn(batch, classes, generator=generator) * 3)


def loss_of(protocol: LabelProtocol, logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None,
            mix: Mix | None = None) -> torch.Tensor:
    return batch_loss(protocol, logits, batch_targets(protocol, labels, soft, mix))


# --- labels -----------------------------------------------------------------------------------------

def test_hard_labels_are_the_reference_cross_entropy_bit_for_bit() -> None:
    logits, _ = student_and_teacher()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(loss_of(LabelProtocol(), logits, labels, None), F.cross_entropy(logits, labels))


def test_mixed_hard_labels_weigh_both_images_by_their_share() -> None:
    """lam CE(y_i) + (1 - lam) CE(y_partner) equals cross-entropy against the mixed one-hot targets."""
    logits, _ = student_and_teacher()
    labels, partner = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([5, 4, 3, 2, 1, 0])
    mixed_one_hot = 0.3 * F.one_hot(labels, 4).float() + 0.7 * F.one_hot(labels[partner], 4).float()
    loss = loss_of(LabelProtocol(), logits, labels, None, Mix(partner, 0.3))
    assert loss == pytest.approx(F.cross_entropy(logits, mixed_one_hot).item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_is_the_temperature_scaled_divergence(temperature: float) -> None:
    student, teacher = student_and_teacher()
    protocol = LabelProtocol("teacher", "kl", temperature)
    expected = F.kl_div(F.log_softmax(student / temperature, 1), F.softmax(teacher / temperature, 1),
                        reduction="batchmean") * temperature ** 2
    assert loss_of(protocol, student, torch.zeros(6, dtype=torch.long), teacher) == pytest.approx(expected.item(),
                                                                                                   rel=1e-5)


def test_soft_cross_entropy_trains_like_kl_up_to_t_squared() -> None:
    """sce and kl differ by the targets' entropy, a constant: their gradients differ by the factor T^2."""
    student, teacher = student_and_teacher()
    labels, gradients = torch.zeros(6, dtype=torch.long), {}
    for name in ("kl", "sce"):
        logits = student.clone().requires_grad_(True)
        loss_of(LabelProtocol("teacher", name, 2.0), logits, labels, teacher).backward()
        gradients[name] = logits.grad
    torch.testing.assert_close(gradients["kl"], 4.0 * gradients["sce"])


def test_mse_plus_ce_adds_the_hard_label_term() -> None:
    student, teacher = student_and_teacher()
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = loss_of(LabelProtocol("teacher", "mse_ce"), student, labels, teacher)
    assert loss == pytest.approx((F.mse_loss(student, teacher) + F.cross_entropy(student, labels)).item(), rel=1e-6)


def test_stored_soft_labels_mix_with_the_images_and_a_teachers_do_not() -> None:
    """Under Mixup a stored label is mixed like its image (the probabilities); a teacher already
    labelled the mixed image, so its probabilities are used as they are."""
    _, teacher = student_and_teacher()
    labels, mix = torch.zeros(6, dtype=torch.long), Mix(torch.tensor([1, 0, 3, 2, 5, 4]), 0.25)
    probabilities = F.softmax(teacher, 1)
    stored = batch_targets(LabelProtocol("stored", "sce"), labels, teacher, mix)[0]
    torch.testing.assert_close(stored, 0.25 * probabilities + 0.75 * probabilities[mix.partner])
    torch.testing.assert_close(batch_targets(LabelProtocol("teacher", "sce"), labels, teacher, mix)[0], probabilities)


def test_probabilities_become_logits_with_the_same_softmax_and_no_infinities() -> None:
    probabilities = torch.tensor([[0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    logits = logits_of_probabilities(probabilities)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(F.softmax(logits, 1), probabilities)


def test_unknown_label_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="label mode"):
        LabelProtocol("fuzzy")
    with pytest.raises(ConfigError, match="temperature"):
        LabelProtocol("teacher", "kl", 0.0)


# --- augmentation ------------------------------------------------------------------------------------

def augmentation(kind: str, seed: int = 0) -> EvalAugmentation:
    dsa = DSA("color_crop", torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))
    return EvalAugmentation(kind, dsa, torch.Generator().manual_seed(seed + 2), torch.Generator().manual_seed(seed + 3))


def images(n: int = 8) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 8, 8).clone()


def test_no_augmentation_returns_the_batch_itself() -> None:
    batch = images()
    augmented, mix = augmentation("none")(batch)
    assert augmented is batch and mix is None


def test_mixup_blends_each_image_with_its_partner() -> None:
    batch = images()
    mixed, mix = augmentation("mixup")(batch)
    assert sorted(mix.partner.tolist()) == list(range(8)) and 0.0 <= mix.lam <= 1.0
    torch.testing.assert_close(mixed, mix.lam * batch + (1 - mix.lam) * batch[mix.partner])


def test_cutmix_pastes_a_box_of_the_partner_and_reports_the_share_kept() -> None:
    """Each image holds its own value outside one box and its partner's inside it; lam is the share
    of its own pixels, counted here."""
    batch = images()
    mixed, mix = augmentation("cutmix", seed=3)(batch)
    own = (mixed == batch).float().mean(dim=(1, 2, 3))
    moved = mix.partner != torch.arange(8)
    assert torch.allclose(own[moved], torch.full((int(moved.sum()),), mix.lam))
    inside = mixed != batch
    assert torch.equal(mixed[inside], batch[mix.partner].expand_as(mixed)[inside])


def test_cut_boxes_stay_inside_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        top, bottom, left, right = cut_box(lam, 8, 6, generator)
        assert 0 <= top <= bottom <= 8 and 0 <= left <= right <= 6


def test_the_same_streams_mix_the_same_way() -> None:
    first, second = augmentation("cutmix")(images()), augmentation("cutmix")(images())
    assert torch.equal(first[0], second[0]) and first[1].lam == second[1].lam


# --- training with soft labels ------------------------------------------------------------------------

class LinearTeacher:
    """A fixed linear map of the pixels: a teacher whose logits depend on the augmented image."""

    def __init__(self, features: int, classes: int) -> None:
        self.weight = torch.randn(features, classes, generator=torch.Generator().manual_seed(7)) * 0.1

    def logits(self, x: torch.Tensor, precision: torch.dtype | None = None) -> torch.Tensor:
        return x.flatten(1) @ self.weight


@pytest.fixture(scope="module")
def small(image_folder: Path):
    dataset = get_dataset("ImageFolder", image_folder, DataOptions(im_size=16))
    return dataset, dataset.train.fetch(torch.arange(24)), dataset.train.labels[:24]


@pytest.mark.parametrize("labels, augmentation_kind", [(LabelProtocol("teacher", "kl"), "cutmix"),
                                                        (LabelProtocol("stored", "mse_ce"), "mixup")])
def test_stacked_soft_label_training_follows_the_sequential_one(small, labels: LabelProtocol,
                                                                augmentation_kind: str) -> None:
    """The vmapped stack gets each network's own targets (its own mix, the teacher run once on all
    augmented batches): the same trajectory as one network after another, to rounding. (At T = 2
    the KL's factor T^2 quadruples the step, and on these few generated images that makes training
    chaotic: even two sequential runs that differ only in rounding, kl at lr 0.01 against sce at lr
    0.04, end 0.2 apart, so no comparison of kernels can be made there.)"""
    dataset, images_, hard = small
    teacher = LinearTeacher(images_[0].numel(), dataset.num_classes)
    stored = teacher.logits(images_)
    protocol = EvalProtocol(epochs=1, batch_train=8, fast=FastPaths(precision=None), augmentation=augmentation_kind,
                            labels=labels, teacher=teacher)
    keys = [("soft", k) for k in range(2)]
    alone = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in keys]
    initial = [parameters_of(member.net) for member in alone]
    for member in alone:
        train_on_set(member.net, images_, hard, protocol, member.order, member.augment, soft_labels=stored)
    together = [EvalNet.fresh("ConvNet", dataset, protocol, 0, key, CPU) for key in keys]
    stacked = train_together(together, images_, hard, protocol, soft_labels=stored)
    for k, member in enumerate(alone):
        distances = update_distances({name: p[k] for name, p in stacked.params.items()}, parameters_of(member.net),
                                     initial[k])
        assert max(distances.values()) < UPDATE_TOLERANCE, distances


def test_soft_labels_change_what_is_learned(small) -> None:
    """The label mode reaches the gradient: a teacher's labels train other weights than hard labels."""
    dataset, images_, hard = small
    teacher = LinearTeacher(images_[0].numel(), dataset.num_classes)
    trained = []
    for labels in (LabelProtocol(), LabelProtocol("teacher", "kl")):
        protocol = EvalProtocol(epochs=0, batch_train=8, fast=FastPaths(precision=None), labels=labels,
                                teacher=teacher)
        member = EvalNet.fresh("ConvNet", dataset, protocol, 0, ("same",), CPU)
        train_on_set(member.net, images_, hard, protocol, member.order, member.augment)
        trained.append(parameters_of(member.net))
    assert any(not torch.equal(trained[0][name], trained[1][name]) for name in trained[0])


# --- validation and selection -------------------------------------------------------------------------

def test_the_validation_split_holds_out_a_share_of_every_class() -> None:
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 3, 2]))
    split = ImageSplit.from_tensors(torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1), labels, 4,
                                    [0.0], [1.0])
    rest, validation = validation_split(split, 4, 0.25, seed=0)
    assert torch.bincount(validation.labels, minlength=4).tolist() == [2, 5, 1, 1]  # round(share), >= 1, < size
    ids = torch.cat([rest.images.flatten(), validation.images.flatten()]).long()
    assert sorted(ids.tolist()) == list(range(len(labels)))  # disjoint and complete
    again = validation_split(split, 4, 0.25, seed=0)[1]
    other = validation_split(split, 4, 0.25, seed=1)[1]
    assert torch.equal(again.images, validation.images) and not torch.equal(other.images, validation.images)


def test_checked_epochs_are_spread_and_end_at_the_last() -> None:
    assert check_epochs(30) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 30]
    assert check_epochs(2) == [0, 1, 2] and check_epochs(0) == [0]


def test_the_best_validation_point_wins_and_ties_go_early() -> None:
    curves = {0.01: {0: 50.0, 4: 70.0}, 0.1: {0: 70.0, 4: 60.0}, 0.001: {0: 70.0}}
    chosen = choose(curves)
    assert (chosen.lr, chosen.epoch, chosen.validation_accuracy) == (0.1, 0, 70.0)


def test_permuting_the_test_labels_changes_no_choice(small) -> None:
    """Selection reads only the validation split: with the test labels shuffled, every validation
    curve, and so the chosen learning rate and epoch, is exactly the same."""
    dataset, images_, hard = small
    rest, validation = validation_split(dataset.train, dataset.num_classes, 0.3, seed=0)
    protocol = EvalProtocol(epochs=1, batch_train=8, fast=FastPaths(precision=None))
    grid = (0.003, 0.03)
    before = select("ConvNet", images_, hard, dataset, protocol, validation, 0, ("perm",), grid)
    shuffled = dataset.test.labels[torch.randperm(len(dataset.test), generator=torch.Generator().manual_seed(1))]
    permuted = replace(dataset, test=replace(dataset.test, labels=shuffled))
    after = select("ConvNet", images_, hard, permuted, protocol, validation, 0, ("perm",), grid)
    assert after == before and set(before.curves) == set(grid) and before.epoch in check_epochs(1)


# --- fingerprint --------------------------------------------------------------------------------------

def test_the_fingerprint_changes_with_every_protocol_choice(small) -> None:
    dataset = small[0]
    protocol = EvalProtocol(epochs=3)

    def fp(**options) -> str:
        return fingerprint(FairOptions(**options), protocol, dataset, ["ConvNet"], 5, 0)["id"]

    base = fp()
    assert fp() == base
    variants = [fp(augmentation="none"), fp(labels=LabelProtocol("stored")), fp(select=True),
                fingerprint(FairOptions(), replace(protocol, epochs=4), dataset, ["ConvNet"], 5, 0)["id"],
                fingerprint(FairOptions(), protocol, dataset, ["ConvNet"], 3, 0)["id"]]
    assert len({base, *variants}) == len(variants) + 1
