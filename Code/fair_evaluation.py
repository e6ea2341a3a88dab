"""A set scored against its controls under one stated protocol (``evaluate.py --controls``).

One evaluation of a set, beyond the reference's hard-label DSA protocol, is
fixed by ``FairOptions``: the label mode and its loss (``eval_labels``), the
augmentation (``eval_augment``), and whether the learning rate and epoch are
chosen on a validation split (``selection``). Everything it depends on is
written into results.json as the protocol fingerprint (``fingerprint``),
whose hash report.py compares before it puts two results in one row.

With controls, round k of ``num_eval`` pairs the k-th network trained on the
set with a network trained on a fresh random real subset (its own draw,
``("random-real", k)``) holding as many images per class as the set STORES
(a mosaic set of IPC 10 decodes to 40 images per class and is compared with
10 real ones: IPC is the storage budget), under the same protocol, label
mode and teacher. The full-data accuracy (hard labels) is the teacher
members' mean test accuracy: a teacher is a network trained on the whole
training split by a stated recipe and cached (``teachers``), so it is
computed once. A soft-label evaluation also evaluates the set with hard
labels (for HLR); ``--ars`` also evaluates the set and its controls without
augmentation (for ARS). Scores are ``scores.summarize_scores`` over rounds.

Selection runs once per source (the set; the round-0 random subset for all
random rounds) and model, and its choice holds for every round.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from data import Dataset, ImageSplit
from distributed import SINGLE, World
from eval_labels import LabelProtocol, logits_of_probabilities
from evaluation import EvalProtocol, evaluate_model, evaluate_set
from sampling import RealSampler
from rng import make_generator
from scores import Round, summarize_scores
from selection import LR_GRID, VALIDATION_FRACTION, Selection, select, validation_split
from synthetic import set_labels
from teachers import canonical_hash

TEACHER_CHUNK = 1024  # images per teacher forward when labelling a whole set
FINGERPRINT_LENGTH = 16


@dataclass(frozen=True)
class FairOptions:
    """The evaluation protocol's choices beyond the reference (defaults: the reference's)."""

    labels: LabelProtocol = LabelProtocol()
    augmentation: str = "dsa"
    select: bool = False
    val_fraction: float = VALIDATION_FRACTION
    lr_grid: tuple[float, ...] = LR_GRID
    controls: bool = False
    ars: bool = False


@dataclass
class LabelledSet:
    """Training images with their labels and, for label mode ``stored``, one soft label (logits) each."""

    images: torch.Tensor
    labels: torch.Tensor
    soft_labels: torch.Tensor | None = None


def teacher_record(teacher: Any) -> dict[str, Any] | None:
    if teacher is None:
        return None
    return {"identity": teacher.identity, "members": teacher.members, "test_accuracy": teacher.test_accuracy,
            "member_accuracies": teacher.member_accuracies}


def fingerprint(options: FairOptions, protocol: EvalProtocol, dataset: Dataset, models: list[str], rounds: int,
                seed: int, teacher: Any = None, teacher_source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every choice the evaluation's numbers depend on; ``id`` hashes the rest. Selected learning rates
    and epochs are outcomes of the rule (each source gets its own), so they are recorded beside it
    (``selected``) and not hashed."""
    record: dict[str, Any] = {
        **options.labels.record(),
        "teacher": {**teacher_record(teacher), **(teacher_source or {})} if teacher is not None else None,
        "augmentation": options.augmentation,
        "dsa_strategy": protocol.dsa_strategy if options.augmentation == "dsa" else None,
        "dsa_mode": protocol.dsa_param.aug_mode if options.augmentation == "dsa" else None,
        "zca": dataset.zca is not None, "dataset": dataset.name, "im_size": list(dataset.im_size),
        "models": list(models), "epochs": protocol.epochs, "batch_train": protocol.batch_train,
        "lr": "selected" if options.select else protocol.lr,
        "selection": ({"rule": "validation", "val_fraction": options.val_fraction, "lr_grid": list(options.lr_grid)}
                      if options.select else {"rule": "none: the protocol's lr, the last epoch"}),
        "rounds": rounds, "seed": seed,
    }
    return {**record, "id": canonical_hash(record, FINGERPRINT_LENGTH)}


def teacher_soft_labels(teacher: Any, images: torch.Tensor, precision: torch.dtype | None) -> torch.Tensor:
    """The teacher's logits on every image, TEACHER_CHUNK at a time."""
    return torch.cat([teacher.logits(chunk, precision) for chunk in images.split(TEACHER_CHUNK)])


def shipped_soft_labels(soft: torch.Tensor, kind: str) -> torch.Tensor:
    """Soft labels as they came with a set, as logits (``kind``: "logits" or "probabilities")."""
    return logits_of_probabilities(soft.float()) if kind == "probabilities" else soft.float()


def draw_random_real(split: ImageSplit, num_classes: int, ipc: int, seed: int, key: tuple[object, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` distinct random images of every class of ``split``, from the stream ``key``."""
    device = split.labels.device
    sampler = RealSampler(split, make_generator(seed, *key, device=device))
    images = torch.cat([sampler.class_batch(c, ipc) for c in range(num_classes)])
    return images, set_labels(range(num_classes), ipc, device)


@dataclass
class FairEvaluator:
    """One evaluation's fixed parts: data, base protocol, seed, processes, teacher, validation split."""

    dataset: Dataset
    protocol: EvalProtocol
    options: FairOptions
    seed: int
    world: World = SINGLE
    teacher: Any = None
    selections: dict[str, dict[str, Selection]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.real, self.validation = self.dataset.train, None
        if self.options.select:
            self.real, self.validation = validation_split(self.dataset.train, self.dataset.num_classes,
                                                          self.options.val_fraction, self.seed)

    def protocol_for(self, labels: LabelProtocol, augmentation: str) -> EvalProtocol:
        """The base protocol under ``labels`` and ``augmentation``; under torchrun stop requests are
        agreed on between evaluations, not acted on inside one (as ``evaluate_set`` does)."""
        return replace(self.protocol, labels=labels, augmentation=augmentation, teacher=self.teacher,
                       interruptible=self.protocol.interruptible and not self.world.distributed)

    def labelled(self, images: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None = None
                 ) -> LabelledSet:
        """The set as label mode ``stored`` needs it: shipped soft labels, else the teacher's."""
        if self.options.labels.mode == "stored" and soft is None:
            soft = teacher_soft_labels(self.teacher, images, self.protocol.fast.precision)
        return LabelledSet(images, labels, soft if self.options.labels.mode == "stored" else None)

    def chosen(self, source: str, model: str, data: LabelledSet, protocol: EvalProtocol, key: tuple[object, ...]
               ) -> EvalProtocol:
        """``protocol`` at the learning rate and epoch selected for ``source`` (unchanged without selection)."""
        if not self.options.select:
            return protocol
        selection = select(model, data.images, data.labels, self.dataset, protocol, self.validation, self.seed,
                           (*key, source), self.options.lr_grid, data.soft_labels, self.world)
        self.selections.setdefault(source, {})[model] = selection
        return replace(protocol, lr=selection.lr, stop_epoch=selection.epoch)

    def evaluate(self, source: str, data: LabelledSet, models: list[str], rounds: int, labels: LabelProtocol,
                 augmentation: str, key: tuple[object, ...]) -> dict[str, list[float]]:
        """Test accuracies (percent) of ``rounds`` networks per model trained on one set."""
        protocol = self.protocol_for(labels, augmentation)
        accuracies = {}
        for model in models:
            chosen = self.chosen(source, model, data, protocol, key)
            accuracies.update(evaluate_set(data.images, data.labels, [model], rounds, self.dataset, chosen,
                                           self.seed, (*key, source), description=source, world=self.world,
                                           soft_labels=data.soft_labels))
        return accuracies

    def random_rounds(self, ipc: int, model: str, rounds: int, labels: LabelProtocol, augmentation: str,
                      key: tuple[object, ...]) -> list[float]:
        """Round k's random real control: a fresh subset of ``ipc`` per class, one network on it."""
        protocol = self.protocol_for(labels, augmentation)

        def subset(k: int) -> LabelledSet:
            return self.labelled(*draw_random_real(self.real, self.dataset.num_classes, ipc, self.seed,
                                                   ("random-real", k)))

        chosen = (self.chosen(f"random_real[{augmentation}]", model, subset(0), protocol, key)
                  if self.options.select else protocol)
        mine = self.world.deals(rounds)
        accuracies = {}
        for k in mine:
            data = subset(k)
            accuracies[k] = evaluate_model(model, data.images, data.labels, self.dataset, chosen, self.seed,
                                           (*key, "random_real", augmentation, model, k),
                                           soft_labels=data.soft_labels)
        gathered = {k: value for share in self.world.gather_objects(accuracies) for k, value in share.items()}
        return [gathered[k] for k in range(rounds)]

    def full_data_accuracy(self) -> float:
        """Hard-label accuracy (percent) of a network trained on the whole training split: the teacher
        members' mean."""
        return sum(self.teacher.member_accuracies) / self.teacher.members


def score(evaluator: FairEvaluator, data: LabelledSet, ipc: int, model: str, set_accuracies: list[float],
          key: tuple[object, ...]) -> dict[str, Any]:
    """The set's controls for ``model`` and its scores, per round and summarised (fractions)."""
    options, rounds = evaluator.options, len(set_accuracies)
    hard = LabelProtocol()
    random = evaluator.random_rounds(ipc, model, rounds, options.labels, options.augmentation, key)
    set_hard = (set_accuracies if not options.labels.soft else
                evaluator.evaluate("set_hard", data, [model], rounds, hard, options.augmentation, key)[model])
    no_aug: tuple[list[float], list[float]] | None = None
    if options.ars:
        no_aug = (evaluator.evaluate("set[none]", data, [model], rounds, options.labels, "none", key)[model],
                  evaluator.random_rounds(ipc, model, rounds, options.labels, "none", key))
    full = evaluator.full_data_accuracy()
    per_round = [Round(s / 100, r / 100, h / 100, *((no_aug[0][k] / 100, no_aug[1][k] / 100) if no_aug else ()))
                 for k, (s, r, h) in enumerate(zip(set_accuracies, random, set_hard))]
    return {"model": model, "ipc_matched": ipc, "ipc_counts": "stored images per class",
            "set": set_accuracies, "set_hard": set_hard, "random_real": random,
            "set_no_augmentation": no_aug[0] if no_aug else None,
            "random_real_no_augmentation": no_aug[1] if no_aug else None,
            "full_data_hard": full, "scores": summarize_scores(per_round, full / 100)}
