"""How much a distilled set is worth beyond random real images: DD-Ranking's scores, in fractions.

A set is scored against two controls evaluated under the same protocol: a
random real subset with the same number of stored images per class, and the
whole training set (hard labels). With accuracies as fractions in [0, 1]:

- HLR (hard label recovery) = acc(full, hard) - acc(set, hard): the accuracy
  the set leaves on the table; lower is better.
- IOR (improvement over random) = acc(set) - acc(random), both under the same
  label mode and augmentation; higher is better.
- LRS (label-robust score) = N(w * IOR - (1 - w) * HLR), w = 0.5 by default.
- ARS (augmentation-robust score) = N(g * IOR_with_aug + (1 - g) * IOR_without),
  g = 0.5 by default.

N(a) = (e^a - e^-1) / (e - e^-1) maps [-1, 1] onto [0, 1], and both
arguments lie in [-1, 1] for fractions, so both scores lie in [0, 1].
Accuracies given in percent would push the exponent far outside that range,
so values above 1 are refused rather than scored. Every score is computed per
round (a round pairs the k-th evaluation network of the set with the k-th of
each control) and reported as the mean and population standard deviation
over rounds, as evaluation accuracies are (``evaluation.summarize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LABEL_WEIGHT = 0.5  # w: weight of IOR against HLR in LRS
AUGMENTATION_WEIGHT = 0.5  # g: weight of IOR with augmentation against without in ARS


def normalised_exp(a: float) -> float:
    """(e^a - e^-1) / (e - e^-1): 0 at a = -1, 1 at a = 1, increasing."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def as_fraction(accuracy: float, what: str) -> float:
    """``accuracy`` checked to be a fraction in [0, 1] (a percentage is refused: it would leave the
    exponent's range and the score [0, 1])."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"{what} accuracy {accuracy} is not a fraction in [0, 1]; give percentages / 100")
    return accuracy


def hard_label_recovery(full_hard: float, set_hard: float) -> float:
    return as_fraction(full_hard, "full-data") - as_fraction(set_hard, "set")


def improvement_over_random(set_accuracy: float, random_accuracy: float) -> float:
    return as_fraction(set_accuracy, "set") - as_fraction(random_accuracy, "random-real")


def label_robust_score(ior: float, hlr: float, w: float = LABEL_WEIGHT) -> float:
    return normalised_exp(w * ior - (1.0 - w) * hlr)


def augmentation_robust_score(ior_with: float, ior_without: float, g: float = AUGMENTATION_WEIGHT) -> float:
    return normalised_exp(g * ior_with + (1.0 - g) * ior_without)


@dataclass(frozen=True)
class Round:
    """One round's accuracies (fractions): the set and its random control under the label mode and
    augmentation being scored, the set under hard labels, and, for ARS, both without augmentation."""

    set_accuracy: float
    random_accuracy: float
    set_hard: float
    set_no_aug: float | None = None
    random_no_aug: float | None = None


def round_scores(r: Round, full_hard: float, w: float = LABEL_WEIGHT,
                 g: float = AUGMENTATION_WEIGHT) -> dict[str, float]:
    """HLR, IOR and LRS of one round, and ARS when the round has its no-augmentation pair."""
    hlr = hard_label_recovery(full_hard, r.set_hard)
    ior = improvement_over_random(r.set_accuracy, r.random_accuracy)
    scores = {"hlr": hlr, "ior": ior, "lrs": label_robust_score(ior, hlr, w)}
    if r.set_no_aug is not None and r.random_no_aug is not None:
        scores["ars"] = augmentation_robust_score(ior, improvement_over_random(r.set_no_aug, r.random_no_aug), g)
    return scores


def summarize_scores(rounds: Sequence[Round], full_hard: float, w: float = LABEL_WEIGHT,
                     g: float = AUGMENTATION_WEIGHT) -> dict[str, dict[str, float]]:
    """Each score's mean and population std over ``rounds`` (ARS only if every round has it)."""
    if not rounds:
        raise ValueError("no rounds to score")
    per_round = [round_scores(r, full_hard, w, g) for r in rounds]
    names = [name for name in per_round[0] if all(name in scores for scores in per_round)]
    return {name: {"mean": float(np.mean([s[name] for s in per_round])),
                   "std": float(np.std([s[name] for s in per_round])), "rounds": len(per_round)}
            for name in names}
